"""``benchmarks/gpu_check.py --dry-run``: the GPU check runs end to end on the CPU with tiny
sizes, so the script that a GPU machine runs for a few minutes cannot rot between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu-check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["WINCLIP_NB_CACHE"] = str(out.parent / "cache")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    report["stdout"] = proc.stdout
    return report


def test_every_section_ran(dry_run):
    sections = dry_run["sections"]
    assert set(sections) == {"tokens", "agreement", "files", "windows", "explain", "benchmark"}
    assert not [name for name, s in sections.items() if "error" in s or "skipped" in s]
    assert dry_run["dry_run"] is True and dry_run["random_weights"] is True


def test_tokens_rows_cover_both_precisions(dry_run):
    rows = dry_run["sections"]["tokens"]["rows"]
    assert {r["precision"] for r in rows} == {"fp32", "fp16"}
    for row in rows:
        assert row["backbone_img_s"] > 0 and row["detect_img_s"] > 0
        assert row["detect_no_fg_img_s"] > 0


def test_half_precision_agrees_on_the_same_memory(dry_run):
    agree = dry_run["sections"]["agreement"]["classes"]["disc"]
    # fp16 vs fp32 of one random model on one memory bank: float noise only (z-scores)
    assert 0 < agree["same_memory"]["max_abs_map_diff"] < 0.1
    assert 0 <= agree["coreset_overlap"] <= 1


def test_explain_and_benchmark_sections(dry_run):
    explain = dry_run["sections"]["explain"]
    assert explain["explainer"].startswith("llava:")
    assert {"000_heatmap.png", "000_boxes.png", "000_report.txt"} <= set(explain["files"])
    bench = dry_run["sections"]["benchmark"]
    assert bench["exit_code"] == 0 and bench["mean"]["pixel_auroc"] is not None


def test_table_is_printed_last(dry_run):
    tail = dry_run["stdout"].strip().splitlines()
    assert tail[-1].startswith("wrote ")
    assert any(line.startswith("tokens @ ") for line in tail)
    assert "random weights: timings and precision differences only" in tail
