"""Stage 01: weights resolution, device, dtype, multi-layer patch tokens."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from winclip_nb import WinCLIPConfig
from winclip_nb.core.errors import ConfigError, DeviceError, WeightsError
from winclip_nb.core.runtime import resolve_device, resolve_dtype
from winclip_nb.hub import weights
from winclip_nb.hub.weights import build_backbone, resolve_weights


def _random_backbone(**settings):
    return build_backbone(WinCLIPConfig(pretrained="random", device="cpu", **settings))


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
        build_backbone(WinCLIPConfig(pretrained=str(bad), device="cpu"))


def test_unknown_tag_and_model():
    with pytest.raises(WeightsError, match="known tags: .*openai"):
        resolve_weights("ViT-B-16", "no_such_tag")
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        resolve_weights("ViT-Q-99", "random")


def test_pretrained_tag_offline_fails_fast_with_remedies(monkeypatch):
    monkeypatch.setattr(weights, "cached_tag_file", lambda *a: None)
    monkeypatch.setattr(weights, "hub_reachable", lambda *a: False)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        resolve_weights("ViT-B-16", "openai")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "prefetch" in message and "random" in message and "local checkpoint" in message


def test_auto_falls_back_to_random_offline(monkeypatch):
    monkeypatch.setattr(weights, "cached_tag_file", lambda *a: None)
    monkeypatch.setattr(weights, "hub_reachable", lambda *a: False)
    w = resolve_weights("ViT-B-16", "auto", auto_tag="openai")
    assert w.random and "auto" in w.label and "offline" in w.label


def test_auto_uses_the_methods_tag_when_cached(monkeypatch, tmp_path):
    """``auto`` means the method's own tag (``auto_tag``), never another of the model's."""
    cached = tmp_path / "open_clip_model.safetensors"
    cached.write_bytes(b"x")
    asked = []

    def cached_tag_file(model_name, tag):
        asked.append((model_name, tag))
        return str(cached)

    monkeypatch.setattr(weights, "cached_tag_file", cached_tag_file)
    monkeypatch.setattr(weights, "hub_reachable", lambda *a: False)
    w = resolve_weights("ViT-B-16-plus-240", "auto", auto_tag="laion400m_e31")
    assert not w.random and w.label == "laion400m_e31" and w.source == str(cached)
    assert set(asked) == {("ViT-B-16-plus-240", "laion400m_e31")}
    # a tag the model does not have: random init, saying why
    w = resolve_weights("ViT-B-16", "auto", auto_tag="no_such_tag")
    assert w.random and "no such tag" in w.label


def test_cached_tag_loads_from_the_cached_file(monkeypatch, tmp_path):
    cached = tmp_path / "open_clip_model.safetensors"
    cached.write_bytes(b"x")
    monkeypatch.setattr(weights, "cached_tag_file", lambda *a: str(cached))
    w = resolve_weights("ViT-B-16", "openai")
    assert w.source == str(cached) and w.label == "openai" and w.quick_gelu


def test_hub_probe_respects_offline_variable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.hub_reachable() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_precision_resolves_to_a_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(ConfigError, match="precision"):
        WinCLIPConfig(precision="fp8")


def test_unknown_layer_indices_are_refused():
    with pytest.raises(ConfigError, match=r"\[12\].*0\.\.11"):
        _random_backbone(layers=(9, 12))


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


def test_pixels_round_trip_to_the_same_uint8_images(random_winclip):
    """``to_images`` inverts ``to_pixels`` exactly (the detector derives foreground masks
    of normalised float input this way); float input passes through ``to_pixels``."""
    bb = random_winclip.backbone
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    images[0, :4] = 0
    images[1, :4] = 255
    pixels = bb.to_pixels(images)
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - bb.mean) / bb.std
    assert torch.allclose(pixels, expected, atol=1e-5)
    assert np.array_equal(bb.to_images(pixels), images)
    assert torch.equal(bb.to_pixels(pixels), pixels)


def test_random_init_is_seeded():
    a = _random_backbone(seed=1)
    b = _random_backbone(seed=1)
    c = _random_backbone(seed=2)
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)
