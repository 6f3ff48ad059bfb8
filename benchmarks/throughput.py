"""Throughput of the winclip_nb detector: backbone only vs. full detection.

A thin wrapper around :mod:`winclip_nb.bench.speed` (the same as ``winclip-nb bench-speed``).

Usage:
    python benchmarks/throughput.py --device cpu --weights random --json speed.json
    python benchmarks/throughput.py --device cuda --batch-size 32
"""

from __future__ import annotations

import sys

from winclip_nb.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
