"""Reliability as a user meets it: signals, a second run, corrupt and diverged checkpoints, own corpora.

Every case runs the real scripts as processes on the committed fixture (the tiny config of
tests/runs.py, whose uninterrupted run is `reference`) and checks that nothing is lost.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import orbax.checkpoint as ocp
import pytest

from flaxformer_lite.train import checksums
from tests import runs
from tests.runs import STEPS, TIMEOUT
from tests.test_faults import _assert_same_run

pytestmark = pytest.mark.slow


def _wait_for_rows(proc, workdir, rows):
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= rows:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before logging {rows} steps")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_and_the_rerun_equals_the_uninterrupted_run(
    sig, prepared, reference, tmp_path
):
    workdir = str(tmp_path / "signalled")
    proc = runs.start(workdir, prepared, "--config.log_every=1")
    _wait_for_rows(proc, workdir, 6)
    proc.send_signal(sig)
    err = runs.finish(proc, expect_ok=False)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    assert last.startswith("saved step ") and last.endswith(f"after {name}; rerun the same command to resume")
    saved = int(last.split()[2])
    assert 6 <= saved < STEPS and str(saved) in os.listdir(os.path.join(workdir, "checkpoints"))
    err = runs.run(workdir, prepared)  # the user's recovery: rerun the same command
    assert f"resumed from the checkpoint at step {saved}" in err  # no step is trained twice
    _assert_same_run(workdir, reference, exact=True, why=f"{name} after step {saved}")


def test_a_second_run_on_the_same_workdir_is_refused_with_the_first_ones_pid(prepared, tmp_path):
    workdir = str(tmp_path / "busy")
    first = runs.start(workdir, prepared, "--config.num_train_steps=100000", "--config.log_every=1")
    try:
        _wait_for_rows(first, workdir, 1)
        second = runs.start(workdir, prepared)
        err = runs.finish(second, expect_ok=False)
        assert second.returncode == 1
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith(f"error: workdir {workdir!r} is in use by another train.py")
        )
        assert f"pid {first.pid} on host " in err and first.poll() is None  # the first one runs on
    finally:
        first.kill()
        first.wait()
    runs.run(workdir, prepared, "--config.num_train_steps=2")  # a killed holder leaves no stale lock


def test_a_corrupt_final_checkpoint_is_moved_aside_and_the_rerun_finishes(prepared, reference, tmp_path):
    workdir = str(tmp_path / "corrupt_final")
    shutil.copytree(reference, workdir)
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(STEPS), "params")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
    err = runs.run(workdir, prepared)
    assert f"moved it to {STEPS}.corrupt-" in err
    ckpts = os.listdir(os.path.join(workdir, "checkpoints"))
    assert str(STEPS) in ckpts and [d for d in ckpts if d.startswith(f"{STEPS}.corrupt-")]
    _assert_same_run(workdir, reference, exact=True, why="after a corrupt final checkpoint")
    runs.run(workdir, prepared)  # and again: nothing left to redo, no error


def _save_nan_params(workdir, step):
    """One value of a step's params set to NaN and saved with matching checksums (a step that was
    saved so, or damaged in a way the checksums cannot see)."""
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(path)
    first = jax.tree_util.tree_leaves_with_path(params)[0][0]
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[(0,) * x.ndim].set(float("nan")) if p == first else x, params
    )
    shutil.rmtree(path)
    ckptr.save(path, params)
    ckptr.wait_until_finished()
    sums_file = os.path.join(workdir, "checkpoints", str(step), "checksums", "metadata")
    sums = json.load(open(sums_file))
    sums["params"] = checksums.tree_checksums(params, sums.get("version", 1))
    json.dump(sums, open(sums_file, "w"))


def test_a_final_checkpoint_with_nan_params_is_moved_aside_and_the_rerun_finishes(
    prepared, reference, tmp_path
):
    """Before issue 38 the run resumed from the NaN step (and every rerun failed at its next step)."""
    workdir = str(tmp_path / "nan_final")
    shutil.copytree(reference, workdir)
    _save_nan_params(workdir, STEPS)
    err = runs.run(workdir, prepared)
    assert "holds NaN or inf values" in err and f"moved it to {STEPS}.corrupt-" in err, err[-3000:]
    assert f"resumed from the checkpoint at step {STEPS - runs.EVERY}" in err
    _assert_same_run(workdir, reference, exact=True, why="after a NaN final checkpoint")


def test_divergence_keeps_the_newest_healthy_checkpoint_and_the_rerun_resumes_there(
    prepared, reference, tmp_path
):
    """Loss x1e6 from step 9, NaN at 17; checkpoints every 4, keep 2: 12 and 16 would rotate 8 out."""
    workdir = str(tmp_path / "diverged")
    proc = runs.start(
        workdir, prepared, "--config.keep_checkpoints=2", FAULT_EXPLODE_FROM_STEP="9", FAULT_NAN_AT_STEP="17"
    )
    err = runs.finish(proc, expect_ok=False)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: loss became nan at step 17"), err[-2000:]
    assert "a rerun resumes from the last healthy checkpoint (step 8 in " in last
    assert "the newer checkpoints [12, 16] had exploding losses and were moved aside" in last
    ckpts = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert "8" in ckpts and "12" not in ckpts and "16" not in ckpts
    assert any(d.startswith("16.diverged-") for d in ckpts)
    err = runs.run(workdir, prepared, "--config.keep_checkpoints=2")  # the diverging cause is gone
    assert "resumed from the checkpoint at step 8" in err
    _assert_same_run(workdir, reference, exact=True, why="resumed from the healthy checkpoint")


def _script(script, *args, stdin=None):
    return subprocess.run(
        [sys.executable, script, "--config=tests/tiny_config.py", *args],
        cwd=runs.ROOT, env=runs.environment(), input=stdin, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip


def test_generate_replaces_bytes_that_are_not_utf8_and_answers_every_line(prepared, reference):
    stdin = b"In the beginning\n\xff\xfe bad bytes\n\nGod said\n"
    flags = [f"--workdir={reference}", f"--config.data_dir={prepared[0]}", "--beam_size=2"]
    proc = _script("generate.py", *flags, stdin=stdin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.decode().count("\n") == 4 and proc.stdout.decode().split("\n")[2] == ""
    assert b"2 bytes that were not UTF-8 replaced" in proc.stderr and b"Traceback" not in proc.stderr


def test_eval_of_an_own_test_file_alone_names_its_outputs_and_keeps_the_others(prepared, reference, tmp_path):
    """A test.tsv alone (no train.tsv) with the workdir's tokenizer; Bible outputs stay untouched."""
    workdir = str(tmp_path / "evals")
    shutil.copytree(reference, workdir)
    common = [f"--workdir={workdir}", f"--config.data_dir={prepared[0]}", "--beam_size=1"]
    bible = _script("eval.py", *common, "--max_examples=4")
    assert bible.returncode == 0, bible.stderr[-2000:]
    assert not [x for x in bible.stderr.decode().splitlines() if x.startswith("I") and "orbax" in x]
    before = {
        f: open(os.path.join(workdir, "eval", f), "rb").read()
        for f in os.listdir(os.path.join(workdir, "eval"))
    }
    corpus = tmp_path / "mine"
    corpus.mkdir()
    (corpus / "test.tsv").write_text("In the beginning\tIm Anfang\nGod said\tGott sprach\nLight\tLicht\n")
    own = [
        "--config.dataset_name=tsv_translate",
        f"--config.manual_dir={corpus}",
        f"--output_dir={tmp_path / 'out'}",
    ]
    proc = _script("eval.py", *common, *own)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs = os.listdir(tmp_path / "out")
    hyp = [f for f in outputs if f.startswith("tsv_translate-") and f.endswith(".test.hyp.txt")]
    assert len(hyp) == 1 and len(open(tmp_path / "out" / hyp[0]).read().splitlines()) == 3
    after = {
        f: open(os.path.join(workdir, "eval", f), "rb").read()
        for f in os.listdir(os.path.join(workdir, "eval"))
    }
    assert after == before
    # Another corpus in the same data dir is prepared afresh, not read from the first one's files.
    (corpus / "test.tsv").write_text("Water\tWasser\n")
    proc = _script("eval.py", *common, *own)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hyp = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".test.hyp.txt"))
    assert len(hyp) == 2 and sorted(len(open(tmp_path / "out" / h).read().splitlines()) for h in hyp) == [
        1,
        3,
    ]


def test_the_log_names_each_attention_path_once(reference):
    """train.py's log says which kernel each attention shape takes (CPU: XLA, and why), once."""
    log = open(os.path.join(reference, "train.0.log")).read()
    lines = [line for line in log.splitlines() if "attention: q(" in line]
    assert lines, "no attention path in the log"
    assert all("xla (no fused kernel on cpu)" in line for line in lines if "bfloat16" not in line)
    assert len(lines) == len(set(line.split("] ", 1)[-1] for line in lines))  # each path once
