"""Images/s of every registered method and of anomalib's WinCLIP, in one run.

A thin wrapper around :mod:`winclip_nb.bench.methods`.

Usage:
    python benchmarks/methods.py --device cpu --n-images 8 --json methods.json
    python benchmarks/methods.py --device cuda --batch-size 32 --n-images 64
"""

from __future__ import annotations

import sys

from winclip_nb.bench.methods import main

if __name__ == "__main__":
    sys.exit(main())
