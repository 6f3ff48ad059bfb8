"""Stage 01: weights resolution, device, multi-layer patch tokens."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from winclip_nb import backbone
from winclip_nb.backbone import ClipBackbone, resolve_device, resolve_weights
from winclip_nb.errors import ConfigError, DeviceError, WeightsError


def test_random_weights_resolve_without_network():
    for name in ("random", "none", None):
        w = resolve_weights("ViT-B-16", name)
        assert w.random and w.source is None


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match="nope.pt"):
        resolve_weights("ViT-B-16", str(missing))


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="weights.pt"):
        ClipBackbone(pretrained=str(bad), device="cpu")


def test_unknown_tag_and_model():
    with pytest.raises(WeightsError, match="known tags: .*openai"):
        resolve_weights("ViT-B-16", "no_such_tag")
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        resolve_weights("ViT-Q-99", "random")


def test_pretrained_tag_offline_fails_fast_with_remedies(monkeypatch):
    monkeypatch.setattr(backbone, "cached_tag_file", lambda *a: None)
    monkeypatch.setattr(backbone, "hub_reachable", lambda *a: False)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        resolve_weights("ViT-B-16", "openai")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "prefetch" in message and "random" in message and "local checkpoint" in message


def test_auto_falls_back_to_random_offline(monkeypatch):
    monkeypatch.setattr(backbone, "cached_tag_file", lambda *a: None)
    monkeypatch.setattr(backbone, "hub_reachable", lambda *a: False)
    w = resolve_weights("ViT-B-16", "auto")
    assert w.random and "auto" in w.label


def test_cached_tag_loads_from_the_cached_file(monkeypatch, tmp_path):
    cached = tmp_path / "open_clip_model.safetensors"
    cached.write_bytes(b"x")
    monkeypatch.setattr(backbone, "cached_tag_file", lambda *a: str(cached))
    w = resolve_weights("ViT-B-16", "openai")
    assert w.source == str(cached) and w.label == "openai" and w.quick_gelu


def test_hub_probe_respects_offline_variable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert backbone.hub_reachable() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_unknown_layer_indices_are_refused():
    with pytest.raises(ConfigError, match=r"\[12\].*0\.\.11"):
        ClipBackbone(pretrained="random", device="cpu", layers=(9, 12))


def test_tokens_shape_norm_and_equal_to_hooks(random_winclip):
    bb = random_winclip.backbone
    images = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    tokens, embedding = bb(images)
    assert tokens.shape == (2, 3, 196, 512) and embedding.shape == (2, 512)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(2, 3, 196), atol=1e-4)
    # The same tokens from forward hooks on the residual blocks, projected by hand.
    visual = bb.model.visual
    captured = []
    handles = [
        visual.transformer.resblocks[i].register_forward_hook(
            lambda _m, _i, out: captured.append(out)
        )
        for i in (9, 10, 11)
    ]
    try:
        with torch.inference_mode():
            bb.model.encode_image(bb.to_pixels(images))
    finally:
        for h in handles:
            h.remove()
    for layer, out in enumerate(captured):
        patches = out[:, 1:] if out.shape[1] == 197 else out[1:].transpose(0, 1)
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(visual.ln_post(patches) @ visual.proj, dim=-1)
        assert torch.allclose(tokens[:, layer], ref, atol=1e-4)


def test_random_init_is_seeded():
    a = ClipBackbone(pretrained="random", device="cpu", seed=1)
    b = ClipBackbone(pretrained="random", device="cpu", seed=1)
    c = ClipBackbone(pretrained="random", device="cpu", seed=2)
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)
