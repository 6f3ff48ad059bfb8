"""Stage 03: coreset, nearest neighbours, the normal memory, memory bank files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from winclip_nb import FittedClass, TextAnchors
from winclip_nb.core.calibration import Calibration
from winclip_nb.core.errors import ConfigError, MemoryBankError
from winclip_nb.core.memory import (
    NormalMemory,
    coreset_size,
    greedy_coreset,
    l2_from_cosine,
    nearest_similarity,
)
from winclip_nb.core.windows import WindowMemory
from winclip_nb.data.banks import FORMAT_VERSION, HEADER_KEY, load_fitted, save_fitted


def test_coreset_picks_farthest_points_on_toy_set():
    # Three clusters on a line; a 3-point k-center coreset must take one from each.
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [20.0], [21.0]])
    idx = greedy_coreset(x, 0.5, projection_dim=None, seed=3)
    assert len(idx) == 3
    assert {int(i) // 2 for i in idx} == {0, 1, 2}
    # Each pick after the start is the point farthest from those chosen so far.
    for k in range(1, len(idx)):
        chosen = x[idx[:k]]
        dist = torch.cdist(x, chosen).min(dim=1).values
        assert dist[idx[k]] == dist.max()


def test_coreset_start_point_is_included_and_seeded():
    x = torch.randn(200, 16)
    gen = torch.Generator().manual_seed(7)
    expected_start = int(torch.randint(200, (1,), generator=gen))
    idx = greedy_coreset(x, 0.1, projection_dim=None, seed=7)
    assert int(idx[0]) == expected_start
    assert torch.equal(idx, greedy_coreset(x, 0.1, projection_dim=None, seed=7))
    assert len(set(idx.tolist())) == len(idx) == coreset_size(200, 0.1) == 20


def test_coreset_with_projection_still_covers_clusters():
    centers = torch.randn(5, 64) * 20
    x = (centers[:, None] + torch.randn(5, 40, 64)).reshape(200, 64)
    idx = greedy_coreset(x, 5 / 200, projection_dim=16, seed=0)
    assert {int(i) // 40 for i in idx} == set(range(5))


def test_coreset_ratio_one_keeps_everything():
    assert torch.equal(greedy_coreset(torch.randn(7, 3), 1.0), torch.arange(7))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_coreset_ratio_out_of_range(ratio):
    with pytest.raises(ConfigError, match="coreset_ratio"):
        greedy_coreset(torch.randn(10, 3), ratio)


def nearest_neighbor_distance(queries, memory, chunk_size=2048, q_groups=None, m_groups=None):
    """L2 distance of unit vectors to their nearest memory row (the NN map's distance)."""
    return l2_from_cosine(nearest_similarity(queries, memory, chunk_size, q_groups, m_groups))


def test_chunked_nn_equals_brute_force():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 50, 8), dim=-1)
    mem = F.normalize(torch.randn(3, 23, 8), dim=-1)
    brute = torch.stack([torch.cdist(q[i], mem[i]).min(dim=1).values for i in range(3)])
    chunked = nearest_neighbor_distance(q, mem, chunk_size=7)
    assert torch.allclose(chunked, brute, atol=1e-5)
    # 2-D inputs work the same way.
    assert torch.allclose(nearest_neighbor_distance(q[0], mem[0], 4), brute[0], atol=1e-5)
    # the similarity itself is the largest cosine, chunked or not
    sim = nearest_similarity(q, mem, chunk_size=7)
    assert torch.allclose(sim, torch.bmm(q, mem.transpose(1, 2)).amax(dim=-1), atol=1e-6)


def test_nn_excludes_same_group():
    q = F.normalize(torch.randn(10, 4), dim=-1)
    mem = q.clone()  # every query has itself in memory at distance 0
    groups = torch.arange(10)
    assert torch.allclose(nearest_neighbor_distance(q, mem), torch.zeros(10), atol=1e-3)
    left_out = nearest_neighbor_distance(q, mem, 3, groups, groups)
    d = torch.cdist(q, mem)
    d.fill_diagonal_(math.inf)
    assert torch.allclose(left_out, d.min(dim=1).values, atol=1e-5)


def test_nearest_similarity_with_groups_by_hand():
    """Queries of image 0 may only match rows of image 1 and vice versa."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    mem = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    q_ids, m_ids = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    assert torch.allclose(nearest_similarity(q, mem), torch.tensor([1.0, 1.0, 0.96]))
    # q0 (1, 0): rows 1, 2 -> max(0, 0.8); q1 (0, 1): rows 1, 2 -> max(1, 0.6);
    # q2 (0.6, 0.8): row 0 only -> 0.6. Chunks of one query give the same.
    expected = torch.tensor([0.8, 1.0, 0.6])
    for chunk in (1, 2, 2048):
        out = nearest_similarity(q, mem, chunk, q_ids, m_ids)
        assert torch.allclose(out, expected), chunk
    # per layer (L, Q, D) with the same groups for every layer
    stacked = nearest_similarity(torch.stack([q, -q]), torch.stack([mem, mem]), 2, q_ids, m_ids)
    assert stacked.shape == (2, 3) and torch.allclose(stacked[0], expected)
    assert torch.allclose(stacked[1], torch.tensor([0.0, -0.6, -0.6]))
    assert torch.allclose(l2_from_cosine(torch.tensor([1.0, 0.0, -1.0])),
                          torch.tensor([0.0, math.sqrt(2), 2.0]))  # fmt: skip


def test_normal_memory_nn_map_averages_layers():
    torch.manual_seed(1)
    tokens = F.normalize(torch.randn(2, 3, 5, 8), dim=-1)  # (B, L, N, D)
    memory = _memory()
    out = memory.nn_map(tokens, chunk_size=3)
    assert out.shape == (2, 5) and memory.size == 12
    per_layer = torch.stack(
        [torch.cdist(tokens[:, layer].reshape(10, 8), memory.bank[layer]).min(dim=1).values
         for layer in range(3)]
    )  # fmt: skip
    assert torch.allclose(out, per_layer.mean(dim=0).view(2, 5), atol=1e-5)
    with pytest.raises(MemoryBankError, match="2 layers but the memory bank has 3"):
        memory.nn_map(tokens[:, :2])


# ======================================================================================
# Memory bank files: a FittedClass (memory, calibration maps, anchors) per file
# ======================================================================================
MODEL = {
    "method": "tokens",
    "model_name": "ViT-B-16",
    "weights": "random",
    "layers": [9, 10, 11],
    "image_size": 224,
    "window_scales": [2, 3],
}


def _memory(layers=(9, 10, 11)):
    bank = F.normalize(torch.randn(len(layers), 12, 8), dim=-1)
    return NormalMemory(bank, torch.arange(12) // 4, torch.arange(12), {"n_images": 3, "seed": 0})


def _fitted(layers=(9, 10, 11), calibrated=True, class_name="disc"):
    anchors = TextAnchors(F.normalize(torch.randn(8), dim=0), F.normalize(torch.randn(8), dim=0),
                          class_name)  # fmt: skip
    calibration = None
    if calibrated:
        maps = {"text_map": torch.rand(3, 2, 2), "nn_map": torch.rand(3, 2, 2)}
        fg = torch.ones(3, 8, 8, dtype=torch.bool)
        fg[0, :4] = False
        calibration = Calibration.from_normal_maps(maps, fg)
    return FittedClass(anchors, _memory(layers), calibration)


def test_memory_save_load_roundtrip(tmp_path):
    fitted = _fitted()
    path = save_fitted(fitted, tmp_path / "bank.safetensors", MODEL)
    loaded = load_fitted(path, MODEL, NormalMemory)
    assert isinstance(loaded, FittedClass) and isinstance(loaded.memory, NormalMemory)
    for name in ("bank", "source_image", "source_patch"):
        assert torch.equal(getattr(loaded.memory, name), getattr(fitted.memory, name)), name
    assert loaded.memory.metadata == fitted.memory.metadata
    # the anchors come back with their class name (on the pair and on each tensor)
    assert loaded.class_name == "disc" and loaded.anchors[0].class_name == "disc"
    assert all(torch.equal(a, b) for a, b in zip(loaded.anchors, fitted.anchors, strict=True))
    # the calibration maps and masks come back, and with them the same statistics
    cal, saved = loaded.calibration, fitted.calibration
    assert torch.equal(cal.fg_masks, saved.fg_masks) and cal.fg_masks.dtype == torch.bool
    for key in ("text_map", "nn_map"):
        assert torch.equal(cal.normal_maps[key], saved.normal_maps[key])
        assert all(
            torch.equal(a, b)
            for a, b in zip(cal.branch_stats[key], saved.branch_stats[key], strict=True)
        )


def test_memory_without_calibration_roundtrip_and_nothing_to_save(tmp_path):
    fitted = _fitted(calibrated=False, class_name=None)
    loaded = load_fitted(save_fitted(fitted, tmp_path / "b.safetensors", MODEL), MODEL,
                         NormalMemory)  # fmt: skip
    assert loaded.calibration is None and loaded.class_name is None
    assert torch.equal(loaded.memory.bank, fitted.memory.bank)
    with pytest.raises(MemoryBankError, match="no memory bank to save"):
        save_fitted(FittedClass(fitted.anchors), tmp_path / "zero.safetensors", MODEL)
    with pytest.raises(MemoryBankError, match="safetensors"):
        save_fitted(fitted, tmp_path / "bank.pt", MODEL)


def test_window_memory_roundtrip(tmp_path):
    """A memory with a list of tensors (one window bank per scale) survives the file."""
    memory = WindowMemory(torch.randn(2 * 9, 6), [torch.randn(2 * 4, 5), torch.randn(2 * 1, 5)],
                          n_references=2, metadata={"window_scales": [2, 3]})  # fmt: skip
    fitted = FittedClass(TextAnchors(torch.randn(5), torch.randn(5), "disc"), memory)
    model = {**MODEL, "method": "windows"}
    loaded = load_fitted(save_fitted(fitted, tmp_path / "w.safetensors", model), model,
                         WindowMemory).memory  # fmt: skip
    assert loaded.n_references == 2 and loaded.metadata == {"window_scales": [2, 3]}
    assert torch.equal(loaded.patch_bank, memory.patch_bank)
    assert len(loaded.window_banks) == 2
    assert all(torch.equal(a, b) for a, b in zip(loaded.window_banks, memory.window_banks,
                                                 strict=True))  # fmt: skip
    # read back into the wrong kind of memory: refused, not a crash later on
    with pytest.raises(MemoryBankError, match="NormalMemory"):
        load_fitted(tmp_path / "w.safetensors", model, NormalMemory)


def test_memory_from_other_layers_is_refused(tmp_path):
    other = {**MODEL, "layers": [6, 9, 11]}
    path = save_fitted(_fitted(layers=(6, 9, 11)), tmp_path / "bank.safetensors", other)
    with pytest.raises(MemoryBankError, match=r"layers=\[6, 9, 11\].*layers=\[9, 10, 11\]"):
        load_fitted(path, MODEL, NormalMemory)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model_name", "ViT-L-14"),
        ("weights", "openai"),
        ("image_size", 112),
        ("method", "windows"),
        ("window_scales", [2]),
    ],
)
def test_memory_from_other_settings_is_refused_naming_the_key(tmp_path, key, value):
    path = save_fitted(_fitted(), tmp_path / "bank.safetensors", MODEL)
    with pytest.raises(MemoryBankError, match=rf"built with {key}=.*this model uses {key}="):
        load_fitted(path, {**MODEL, key: value}, NormalMemory)


def test_memory_of_format_1_is_refused_with_a_rebuild_hint(tmp_path):
    """Files of the first format held a bare NormalMemory; they are not read any more."""
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    meta = {"format_version": 1, "model_name": "ViT-B-16", "weights": "random",
            "layers": [9, 10, 11], "image_size": 224}  # fmt: skip
    memory = _memory()
    save_file({"bank": memory.bank, "source_image": memory.source_image,
               "source_patch": memory.source_patch},
              str(path), metadata={HEADER_KEY: json.dumps(meta)})  # fmt: skip
    with pytest.raises(MemoryBankError, match=r"older format \(1\); rebuild it"):
        load_fitted(path, MODEL, NormalMemory)


def test_memory_only_from_safetensors(tmp_path):
    with pytest.raises(MemoryBankError, match="safetensors"):
        load_fitted(tmp_path / "bank.pt", MODEL, NormalMemory)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MemoryBankError, match="bad.safetensors"):
        load_fitted(bad, MODEL, NormalMemory)
    with pytest.raises(MemoryBankError, match="not found"):
        load_fitted(tmp_path / "missing.safetensors", MODEL, NormalMemory)


def test_memory_metadata_is_json_in_header(tmp_path):
    from safetensors import safe_open

    path = save_fitted(_fitted(), tmp_path / "bank.safetensors", MODEL)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[HEADER_KEY])
        keys = set(handle.keys())
    assert meta["model"]["model_name"] == "ViT-B-16" and meta["format_version"] == FORMAT_VERSION
    assert meta["model"] == MODEL and meta["class_name"] == "disc"
    assert FORMAT_VERSION == 2
    assert {"memory.bank", "anchors.normal", "anchors.anomalous", "calibration.text_map",
            "calibration.nn_map", "calibration.fg_masks"} <= keys  # fmt: skip
