"""Separate processes with the same seed and config give bitwise identical results.

Two fresh interpreters run the benchmark on a small synthetic set and dump the
evaluated anomaly maps; the second one uses another torch thread count and another
import order. ``results.json`` must be byte-identical apart from timing fields, and
the maps and scores bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from winclip_nb.bench import store as B
from winclip_nb.data import make_synthetic_mvtec

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 112
#: Per-class fields that are measured times, not results.
TIMING_KEYS = ("seconds", "memory_seconds", "test_seconds", "images_per_s", "peak_gpu_mb")

RUN = """
import os, sys
for name in PRE_IMPORTS:
    __import__(name)
import numpy as np
import torch
if THREADS:
    torch.set_num_threads(THREADS)
from winclip_nb import WinCLIP, WinCLIPConfig, cli
from winclip_nb.bench.config import BenchmarkConfig
from winclip_nb.bench.protocol import evaluate_class
from winclip_nb.data import load_mvtec_class

assert cli.main(ARGS) == 0
model = WinCLIPConfig(pretrained="random", image_size=IMAGE_SIZE, device="cpu", batch_size=4)
cfg = BenchmarkConfig(model=model)
winclip = WinCLIP(config=model)
out = evaluate_class(winclip, load_mvtec_class(ROOT, "disc"), cfg, progress=False,
                     return_maps=True)
assert winclip.fitted is None  # evaluate_class leaves the detector as it was
np.save(os.path.join(OUT, "maps.npy"), np.asarray(out["maps"]))
np.save(os.path.join(OUT, "scores.npy"), np.asarray(out["scores"]))
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic_mvtec(
        tmp_path_factory.mktemp("repro_mvtec"),
        ["disc"],
        n_train=3,
        n_test_good=2,
        n_test_per_defect=1,
        image_size=96,
    )


def _run(root: Path, out: Path, threads: int, pre_imports: tuple[str, ...]) -> Path:
    args = [
        "benchmark", "--data-root", str(root), "--weights", "random",
        "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--batch-size", "4",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    code = (
        f"ARGS = {args!r}\nROOT = {str(root)!r}\nOUT = {str(out)!r}\n"
        f"IMAGE_SIZE = {IMAGE_SIZE}\nTHREADS = {threads}\nPRE_IMPORTS = {pre_imports!r}\n" + RUN
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _without_timing(results: dict) -> dict:
    results = json.loads(json.dumps(results))
    config = results["config"]
    for key in B.RUNTIME_KEYS:
        config.pop(key, None)
    for block in [*results["classes"].values(), results["mean"]]:
        for key in TIMING_KEYS:
            block.pop(key, None)
    return results


def test_separate_processes_give_identical_results(root, tmp_path):
    first = _run(root, tmp_path / "first", threads=0, pre_imports=())
    second = _run(root, tmp_path / "second", threads=1, pre_imports=("cv2", "scipy.ndimage"))
    a = json.loads((first / B.RESULTS_JSON).read_text(encoding="utf-8"))
    b = json.loads((second / B.RESULTS_JSON).read_text(encoding="utf-8"))
    assert a["classes"]["disc"]["n_test"] > 0
    assert json.dumps(_without_timing(a), sort_keys=True) == json.dumps(
        _without_timing(b), sort_keys=True
    )
    maps_a, maps_b = np.load(first / "maps.npy"), np.load(second / "maps.npy")
    assert maps_a.shape[0] == a["classes"]["disc"]["n_test"] and maps_a.astype(np.float32).std() > 0
    assert maps_a.tobytes() == maps_b.tobytes()
    assert np.load(first / "scores.npy").tobytes() == np.load(second / "scores.npy").tobytes()
