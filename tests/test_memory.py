"""Stage 03: coreset, nearest-neighbour distance, memory bank files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from winclip_nb.errors import ConfigError, MemoryBankError
from winclip_nb.memory import (
    NormalMemory,
    coreset_size,
    greedy_coreset,
    nearest_neighbor_distance,
)


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


def test_chunked_nn_equals_brute_force():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 50, 8), dim=-1)
    mem = F.normalize(torch.randn(3, 23, 8), dim=-1)
    brute = torch.stack([torch.cdist(q[i], mem[i]).min(dim=1).values for i in range(3)])
    chunked = nearest_neighbor_distance(q, mem, chunk_size=7)
    assert torch.allclose(chunked, brute, atol=1e-5)
    # 2-D inputs work the same way.
    assert torch.allclose(nearest_neighbor_distance(q[0], mem[0], 4), brute[0], atol=1e-5)


def test_nn_excludes_same_group():
    q = F.normalize(torch.randn(10, 4), dim=-1)
    mem = q.clone()  # every query has itself in memory at distance 0
    groups = torch.arange(10)
    assert torch.allclose(nearest_neighbor_distance(q, mem), torch.zeros(10), atol=1e-3)
    left_out = nearest_neighbor_distance(q, mem, 3, groups, groups)
    d = torch.cdist(q, mem)
    d.fill_diagonal_(math.inf)
    assert torch.allclose(left_out, d.min(dim=1).values, atol=1e-5)


def _memory(layers=(9, 10, 11)):
    bank = F.normalize(torch.randn(len(layers), 12, 8), dim=-1)
    meta = {
        "model_name": "ViT-B-16",
        "weights": "random",
        "layers": list(layers),
        "image_size": 224,
    }
    return NormalMemory(bank, torch.arange(12) // 4, torch.arange(12), meta)


def test_memory_save_load_roundtrip(tmp_path):
    memory = _memory()
    memory.train_nn_maps = torch.rand(3, 2, 2)
    path = memory.save(tmp_path / "bank.safetensors")
    expected = {
        "model_name": "ViT-B-16",
        "weights": "random",
        "layers": [9, 10, 11],
        "image_size": 224,
    }
    loaded = NormalMemory.load(path, expected)
    assert torch.equal(loaded.bank, memory.bank)
    assert torch.equal(loaded.train_nn_maps, memory.train_nn_maps)
    assert loaded.metadata["layers"] == [9, 10, 11]


def test_memory_from_other_layers_is_refused(tmp_path):
    path = _memory(layers=(6, 9, 11)).save(tmp_path / "bank.safetensors")
    with pytest.raises(MemoryBankError, match=r"layers=\[6, 9, 11\].*layers=\[9, 10, 11\]"):
        NormalMemory.load(path, {"layers": [9, 10, 11]})


def test_memory_only_from_safetensors(tmp_path):
    with pytest.raises(MemoryBankError, match="safetensors"):
        NormalMemory.load(tmp_path / "bank.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MemoryBankError, match="bad.safetensors"):
        NormalMemory.load(bad)
    with pytest.raises(MemoryBankError, match="not found"):
        NormalMemory.load(tmp_path / "missing.safetensors")


def test_memory_metadata_is_json_in_header(tmp_path):
    from safetensors import safe_open

    path = _memory().save(tmp_path / "bank.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["winclip_nb"])
    assert meta["model_name"] == "ViT-B-16" and meta["format_version"] == 1
