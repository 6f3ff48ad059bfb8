"""Shared fixtures: a small synthetic MVTec-format set and one random-init detector."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from winclip_nb.data import make_synthetic_mvtec

torch.set_num_threads(2)

#: Small enough for CI, large enough for a meaningful pixel AUROC.
TEST_SET = {"n_train": 6, "n_test_good": 3, "n_test_per_defect": 2, "image_size": 128}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    return make_synthetic_mvtec(root, seed=0, **TEST_SET)


@pytest.fixture(scope="session")
def random_winclip():
    """One random-init ViT-B-16 detector (CPU, seed 0) shared by the core tests."""
    from winclip_nb import WinCLIP

    return WinCLIP(device="cpu", pretrained="random")


@pytest.fixture(scope="module")
def reused_models() -> Iterator[dict]:
    """For one test module, the benchmark builds one model per (weights, seed, image size,
    layers, device) and reuses it: its text cache then makes every class's anchors a
    one-time cost. Yields the cache (how many models were built)."""
    from winclip_nb import benchmark as B

    cache: dict = {}
    real = B._load_model

    def load(cfg, weights, seed, device):
        key = (weights, seed, cfg.image_size, tuple(cfg.layers), str(device))
        if key not in cache:
            cache[key] = real(cfg, weights, seed, device)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "_load_model", load)
        yield cache
