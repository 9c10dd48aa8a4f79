"""benchmarks/device_check.py --dry_run: every part of the prepared GPU check runs on the CPU."""

import json
import subprocess
import sys

import pytest

from tests.runs import ROOT


@pytest.mark.slow
def test_the_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", f"--out={tmp_path}", "--dry_run"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "device_check.jsonl")]
    status = {r["part"]: r["status"] for r in rows if "status" in r}
    assert status == {
        "gpu_tests": "ok", "train_wmt_base": "ok", "train_gpt2": "ok", "beam4": "ok", "input_wmt_base": "ok",
        "input_gpt2": "ok", "anchor_flax": "skipped", "anchor_nanogpt": "skipped",
    }  # fmt: skip
    gpu = next(r for r in rows if r["part"] == "gpu_tests")
    assert gpu["pytest"].startswith("2 passed")  # the GPU tier ran (CPU standing in), not skipped
    figures = {r["part"]: r for r in rows if "benchmark" in r}
    assert figures["train_gpt2"]["target_tokens_per_sec"] > 0 and figures["beam4"]["sentences_per_sec"] > 0
    bound = [r for r in rows if r["part"] == "input_bound"]
    assert {r["preset"] for r in bound} == {"train_wmt_base", "train_gpt2"}
    assert all(r["pipeline_over_step"] > 0 for r in bound)
