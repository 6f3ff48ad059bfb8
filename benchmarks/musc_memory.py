"""Peak memory and time of MuSc scoring one set of N images (random weights).

MuSc scores every image of a set against all the others. Its pairwise work is streamed
in chunks of query images (``MUSC_CHUNK_BYTES``), so what grows with N is the patch
tokens of the set (N x 4 blocks x 256 patches x 768 floats at 256 px), not the N x N
similarity. This script builds the musc detector, makes N seeded random images, and
prints the process's peak resident memory before and after scoring them as one set
(on a GPU also the peak of allocated GPU memory), and the time it took.

Usage:
    python benchmarks/musc_memory.py --n-images 100
    python benchmarks/musc_memory.py --n-images 20 --chunk-mib 64
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-mib", type=int, default=None,
                        help="chunk size of the pairwise work (default: MUSC_CHUNK_BYTES)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from winclip_nb import WinCLIP
    from winclip_nb.core import musc
    from winclip_nb.core.detector import FittedClass

    if args.chunk_mib:
        musc.MUSC_CHUNK_BYTES = args.chunk_mib * 2**20
    detector = WinCLIP(method="musc", pretrained="random", device=args.device)
    size = detector.config.image_size
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (args.n_images, size, size, 3), dtype=np.uint8)
    fitted = FittedClass(detector.scorer.anchors("random"))
    if detector.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mib()
    start = time.perf_counter()
    out = detector.detect_batch(images, fitted)
    seconds = time.perf_counter() - start
    after = peak_rss_mib()
    tokens_mib = args.n_images * len(detector.config.layers) * int(np.prod(
        detector.backbone.grid_size)) * detector.backbone.model.visual.transformer.width * 4 / 2**20
    print(f"musc, {args.n_images} images at {size} px as one set, {detector.device}, "
          f"chunks of {musc.MUSC_CHUNK_BYTES / 2**20:.0f} MiB, random weights")
    print(f"peak resident memory: {before:.0f} MiB before scoring (model, images), "
          f"{after:.0f} MiB after (+{after - before:.0f} MiB)")
    print(f"patch tokens of the set (fp32): {tokens_mib:.0f} MiB")
    if detector.device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"time: {seconds:.1f} s ({args.n_images / seconds:.2f} images/s); "
          f"scores {out['score'].shape[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
