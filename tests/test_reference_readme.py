"""The promises of the README of the implementation this project re-implements, kept.

Every Python call shown in that README's *Quick Start*, *Adjustable Settings* and
*Troubleshooting* sections runs here with the same arguments (``device='cuda'`` becomes
``'cpu'``), offline, against a random-init ViT-B-16 checkpoint placed in a temporary
Hugging Face cache under the real ``openai`` tag, and the test checks what that README
says happens:

Quick Start::

    winclip = WinCLIP(device='cuda')
    normal_anchor, anomalous_anchor = winclip.build_text_anchors('screw')
    winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor)
    result = detect_and_explain(winclip, image_path, normal_anchor, anomalous_anchor,
                                class_name='screw', use_llava=True)
    print(result['explanation'])       # Saves: heatmap, boxes, structured report

Adjustable Settings::

    result = winclip.detect(..., text_weight=0.4, nn_weight=0.6)
    winclip.build_normal_memory(..., coreset_ratio=0.05)
    winclip.build_normal_memory(..., coreset_ratio=0.2)
    winclip = WinCLIP(layers=[6, 9, 11])

Troubleshooting::

    winclip.build_normal_memory(..., max_images=20, coreset_ratio=0.05)
    result = detect_and_explain(..., use_llava=False)
    fg_mask = winclip.compute_foreground_mask(img, threshold=0.1)
    winclip = WinCLIP(model_name="ViT-L-14", pretrained="openai")   # name and tag resolve,
                                                                    # a random-init model builds

"LLaVA not loading? ... System will use rule-based explanations as fallback": no LLaVA is
in the cache, so ``use_llava=True`` must fall back, say so once, and name the explainer
it used. The files are ``{name}_heatmap.png``, ``{name}_boxes.png``, ``{name}_report.txt``.
"""

from __future__ import annotations

import os

import pytest
from test_caches import _add_hub_file, _clip_bytes, _run  # the hub-cache helpers

from winclip_nb.hub.weights import hub_weight_files

SNIPPETS = r"""
import math, os, warnings
from pathlib import Path
import numpy as np
import torch
from winclip_nb import WinCLIP, detect_and_explain
from winclip_nb.core.maps import fuse_maps
from winclip_nb.data import load_mvtec_class, make_synthetic_mvtec

RESULT = {}
root = make_synthetic_mvtec(Path("data"), ["disc"], n_train=24, n_test_good=1,
                            n_test_per_defect=1, image_size=128)
data = load_mvtec_class(root, "disc")
train_images = data.train
image_path = next(s.path for s in data.test if s.defect == "hole")

# --- Quick Start ---------------------------------------------------------------------
winclip = WinCLIP(device='cpu')
RESULT["weights"], RESULT["random_weights"] = winclip.weights_label, winclip.random_weights
normal_anchor, anomalous_anchor = winclip.build_text_anchors('screw')
winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = detect_and_explain(
        winclip, image_path, normal_anchor, anomalous_anchor,
        class_name='screw', use_llava=True
    )
    again = detect_and_explain(winclip, image_path, normal_anchor, anomalous_anchor,
                               class_name='screw', use_llava=True)
print(result['explanation'])
RESULT["explanation"] = result["explanation"]
RESULT["explainer"] = result["explainer"]
RESULT["warnings"] = [str(w.message) for w in caught]
RESULT["paths"] = {k: os.path.relpath(v) for k, v in result["paths"].items()}
RESULT["files"] = sorted(p.name for p in Path("reports").iterdir())

# --- Adjustable Settings ---------------------------------------------------------------
default = winclip.detect(image_path, normal_anchor, anomalous_anchor)
result = winclip.detect(image_path, normal_anchor, anomalous_anchor, text_weight=0.4, nn_weight=0.6)
stats = winclip.fitted.calibration.branch_stats
text, nn = (torch.from_numpy(m)[None] for m in (result.text_map, result.nn_map))
by_hand = fuse_maps(text, nn, 0.4, 0.6, stats["text_map"], stats["nn_map"])[0].numpy()
RESULT["weights_applied"] = bool(np.allclose(result.fused_map, by_hand, atol=1e-5))
RESULT["weights_change_map"] = bool(np.abs(result.fused_map - default.fused_map).max() > 1e-4)
n_patches = len(train_images) * 196
for ratio in (0.05, 0.2):
    fitted = winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor,
                                         coreset_ratio=ratio)
    RESULT[f"memory_{ratio}"] = [fitted.memory.size, math.ceil(ratio * n_patches)]
layered = WinCLIP(layers=[6, 9, 11])
RESULT["layers"] = [list(layered.config.layers), list(layered.backbone.layers),
                    int(layered.backbone(np.zeros((1, 224, 224, 3), np.uint8))[0].shape[1])]

# --- Troubleshooting ---------------------------------------------------------------------
fitted = winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor,
                                     max_images=20, coreset_ratio=0.05)
RESULT["max_images"] = [fitted.memory.metadata["n_images"], fitted.memory.size,
                        math.ceil(0.05 * 20 * 196)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = detect_and_explain(winclip, image_path, normal_anchor, anomalous_anchor,
                                class_name='screw', use_llava=False)
RESULT["no_llava"] = [result["explainer"], [str(w.message) for w in caught]]
img = str(image_path)
fg_mask = winclip.compute_foreground_mask(img, threshold=0.1)
loose = winclip.compute_foreground_mask(img, threshold=0.6)
RESULT["fg_mask"] = [list(fg_mask.shape), str(fg_mask.dtype), float(fg_mask.mean()),
                     float(loose.mean())]

import open_clip
from winclip_nb import WeightsError
from winclip_nb.hub.weights import resolve_weights
RESULT["vit_l_tags"] = "openai" in open_clip.list_pretrained_tags_by_model("ViT-L-14")
try:
    WinCLIP(model_name="ViT-L-14", pretrained="openai")
    RESULT["vit_l_openai"] = "loaded"
except WeightsError as err:  # not in this cache, offline: a clear error naming the remedies
    RESULT["vit_l_openai"] = str(err)
big = WinCLIP(model_name="ViT-L-14", pretrained="random")
RESULT["vit_l_random"] = [list(big.grid_size), big.backbone.embed_dim, big.random_weights]
"""


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict:
    import open_clip

    home = tmp_path_factory.mktemp("hf_home_readme")
    scratch = tmp_path_factory.mktemp("scratch_readme")
    repo_id, names = hub_weight_files(open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"])
    _add_hub_file(home / "hub", repo_id, names[0], _clip_bytes("ViT-B-16", names[0], scratch))
    workdir = tmp_path_factory.mktemp("readme_cwd")  # the snippets write reports/ here
    return _run(SNIPPETS, home, offline=True, timeout=900, cwd=workdir)


def test_quick_start_loads_the_cached_openai_weights(readme_run):
    assert readme_run["weights"] == "openai" and readme_run["random_weights"] is False


def test_quick_start_falls_back_to_rules_when_llava_cannot_load(readme_run):
    assert readme_run["explainer"] == "rule-based"
    llava = [w for w in readme_run["warnings"] if "LLaVA" in w]
    assert len(llava) == 1, readme_run["warnings"]  # once, though explained twice
    assert "rule-based" in llava[0] and "llava-onevision" in llava[0].lower()
    assert "Explainer:      rule-based" in readme_run["explanation"]


def test_quick_start_saves_heatmap_boxes_and_report(readme_run):
    files = readme_run["files"]
    for suffix in ("heatmap.png", "boxes.png", "report.txt", "report.json"):
        assert f"000_{suffix}" in files, files
    assert readme_run["paths"]["report_txt"] == os.path.join("reports", "000_report.txt")
    assert not [f for f in files if f.startswith("000_2")], "the same image must reuse its name"


def test_adjustable_settings(readme_run):
    assert readme_run["weights_applied"] and readme_run["weights_change_map"]
    for ratio in ("0.05", "0.2"):
        size, expected = readme_run[f"memory_{ratio}"]
        assert size == expected
    assert readme_run["layers"] == [[6, 9, 11], [6, 9, 11], 3]


def test_troubleshooting(readme_run):
    n_images, size, expected = readme_run["max_images"]
    assert n_images == 20 and size == expected
    explainer, caught = readme_run["no_llava"]
    assert explainer == "rule-based" and not [w for w in caught if "LLaVA" in w]
    shape, dtype, fraction, loose = readme_run["fg_mask"]
    assert shape == [128, 128] and dtype == "bool" and 0.05 < fraction < 0.95
    assert loose < fraction  # the threshold is applied
    assert readme_run["vit_l_tags"] is True
    assert "winclip-nb prefetch" in readme_run["vit_l_openai"]
    assert readme_run["vit_l_random"] == [[16, 16], 768, True]
