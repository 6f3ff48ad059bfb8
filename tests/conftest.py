"""Shared fixtures: a small synthetic MVTec-format set and one random-init detector."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Before torch runs a kernel: the same MKL / oneDNN kernels on every machine, as in the
# notebooks' reference mode (winclip_nb.nb.helpers.REFERENCE_CPU_KERNELS).
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402

from winclip_nb.data import make_synthetic_mvtec  # noqa: E402

torch.set_num_threads(2)

#: Small enough for CI, large enough for a meaningful pixel AUROC.
TEST_SET = {"n_train": 6, "n_test_good": 3, "n_test_per_defect": 2, "image_size": 128}


@pytest.fixture(autouse=True)
def _fresh_llava_fallback_notice(monkeypatch):
    """Each test sees the once-per-model LLaVA fallback warning afresh."""
    from winclip_nb.explain import llava

    monkeypatch.setattr(llava, "_FALLBACK_WARNED", set())


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
    """For one test module, the benchmark loads one backbone per (weights, seed, model,
    image size, layers, device, precision) and reuses it under each run's settings: its
    text cache then makes every class's anchors a one-time cost. Yields the cache (how
    many backbones were loaded)."""
    from winclip_nb.bench import protocol as B

    cache: dict = {}
    real = B._load_model

    def load(cfg, weights, seed, device, backbone=None):
        m = cfg.model
        key = (weights, seed, m.model_name, m.image_size, m.layers, str(device), m.precision)
        model = real(cfg, weights, seed, device, backbone=backbone or cache.get(key))
        cache.setdefault(key, model.backbone)
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "_load_model", load)
        yield cache
