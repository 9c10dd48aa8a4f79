"""Choosing and averaging models (issue 28) and checksummed checkpoints (issue 27 item 1; the sums
themselves in test_checksums.py).

The rules against closed forms and numpy; then real train.py / eval.py / average processes on the
committed fixture (tests/runs.py), checked against numpy on the checkpoints they wrote.
"""

import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flaxformer_lite.train import selection, training
from tests import runs
from tests.runs import STEPS

NAN = float("nan")


# ---- rules


def test_best_steps_rank_ties_to_the_earlier_step_and_nan_last():
    scores = [(4, 10.0), (8, 12.0), (12, NAN), (16, 12.0), (20, 11.0)]
    assert selection.best_steps(scores, "max", 3) == [8, 16, 20]
    assert selection.best_steps(scores, "max", 5) == [8, 16, 20, 4, 12]
    assert selection.best_steps(scores, "min", 2) == [4, 20]


def test_patience_stops_after_that_many_evaluations_without_a_strictly_better_score():
    early = selection.EarlyStopping("bleu", "max", patience=2, keep_best=0)
    stops = []
    for step, bleu in zip([1, 2, 3, 4, 5], [1.0, 3.0, 3.0, NAN, 2.0], strict=True):  # a tie and a NaN
        assert early.add(step, {"bleu": bleu}) == {"valid_bleu": bleu}
        stops.append(early.stopped)
    assert stops == [False, False, False, True, True] and early.best == (2, 3.0)
    assert early.reason.startswith("early stop at step 5: validation bleu has not improved for 2 evaluations")


def test_ema_update_is_the_numpy_recurrence():
    ema, params = {"w": np.ones((3,), np.float32)}, {"w": np.arange(3, dtype=np.float32)}
    for step, decay in [(0, 0.999), (5, 0.999), (10_000, 0.999), (10_000, 0.5)]:
        d = min(decay, (1 + step) / (10 + step))
        want = d * ema["w"].astype(np.float64) + (1 - d) * params["w"]
        got = training.ema_update(ema, params, jnp.int32(step), decay)["w"]
        np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- processes


def _read(workdir: str, step: int, item: str = "params", folder: str = "checkpoints") -> dict:
    """{name: array} of one item of one step, read with orbax on one device (whatever wrote it)."""
    path = os.path.join(workdir, folder, str(step), item)
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = ckptr.restore(
        path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    )
    return {k: np.asarray(v) for k, v in runs._flatten(tree).items()}


SELECT = (
    "--config.valid_metric=loss", "--config.eval_every=4", "--config.keep_best=2",
    "--config.keep_checkpoints=1", "--config.ema_decay=0.9", "--config.log_every=4",
)  # fmt: skip


@pytest.fixture(scope="module")
def selected(prepared, tmp_path_factory):
    """One uninterrupted run that scores validation loss every 4 steps and keeps an EMA."""
    workdir = str(tmp_path_factory.mktemp("selected") / "run")
    runs.run(workdir, prepared, *SELECT)
    return workdir


def _eval_rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["nll"] for r in rows if r["split"] == "eval" and r["step"] <= STEPS}


@pytest.mark.slow
def test_keep_best_keeps_the_best_steps_of_the_log_and_eval_reads_the_best(selected, prepared):
    scores = _eval_rows(selected)
    assert sorted(scores) == [4, 8, 12, 16, 20, 24]
    best = selection.best_steps(sorted(scores.items()), "min", 2)
    kept = sorted(int(d) for d in os.listdir(os.path.join(selected, "checkpoints")) if d.isdigit())
    assert kept == sorted(set(best) | {STEPS})  # the two best by the log, and the newest
    proc = runs.script("eval.py", f"--workdir={selected}", f"--config.data_dir={prepared[0]}",
                       "--checkpoint=best", "--beam_size=1", "--max_examples=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(open(next(_eval_json(selected, ".best"))).read())
    assert summary["checkpoint_step"] == best[0] and summary["checkpoint"] == "best"
    assert f"read the ema weights of step {best[0]}" in proc.stderr.decode()


def _eval_json(workdir, which=""):
    """eval.py's summary of the test split; `which`: ".best", ".averaged"... (its file-name suffix)."""
    folder = os.path.join(workdir, "eval")
    return (os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(f".test{which}.json"))


@pytest.mark.slow
def test_average_of_the_best_equals_numpy_and_eval_reads_it(selected, prepared):
    proc = runs.script(
        "-m", "flaxformer_lite.tools.average", f"--workdir={selected}", "--best=2", "--weights=ema"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = selection.best_steps(sorted(_eval_rows(selected).items()), "min", 2)
    parts = [_read(selected, s, "ema") for s in best]
    averaged = _read(selected, max(best), "params", folder="averaged")
    for name, value in averaged.items():
        want = np.mean([p[name].astype(np.float64) for p in parts], axis=0).astype(np.float32)
        np.testing.assert_array_equal(value, want, err_msg=name)
    config = json.load(open(os.path.join(selected, "averaged", str(max(best)), "config", "metadata")))
    assert config["averaged_from"] == sorted(best)
    proc = runs.script("eval.py", f"--workdir={selected}", f"--config.data_dir={prepared[0]}",
                       "--checkpoint=averaged", "--beam_size=1", "--max_examples=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = runs.script("-m", "flaxformer_lite.tools.average", f"--workdir={selected}", "--last=5")
    assert proc.returncode == 1 and b"asked to average 5 but" in proc.stderr


@pytest.mark.slow
def test_ema_in_checkpoints_follows_the_numpy_recurrence_over_the_recorded_params(prepared, tmp_path):
    workdir = str(tmp_path / "ema")
    every = ("--config.ema_decay=0.9", "--config.checkpoint_every=1", "--config.keep_checkpoints=100")
    runs.run(workdir, prepared, *every, "--config.num_train_steps=5")
    for step in range(2, 6):
        d = min(0.9, step / (9 + step))  # the update to `step` runs with the step counter at step - 1
        before, params, ema = (
            _read(workdir, step - 1, "ema"),
            _read(workdir, step),
            _read(workdir, step, "ema"),
        )
        for name, value in ema.items():
            want = d * before[name].astype(np.float64) + (1 - d) * params[name]
            np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=f"{name} at {step}")


@pytest.mark.slow
def test_kill_9_with_ema_then_rerun_is_bitwise_the_uninterrupted_run(selected, prepared, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = runs.start(workdir, prepared, *SELECT)
    ckpts = os.path.join(workdir, "checkpoints")
    kill_after = random.Random(0).choice([8, 12])
    while proc.poll() is None and not (os.path.isdir(ckpts) and str(kill_after) in os.listdir(ckpts)):
        pass
    proc.kill()
    proc.wait()
    runs.run(workdir, prepared, *SELECT)
    for item in ("params", "ema"):
        got, want = _read(workdir, STEPS, item), _read(selected, STEPS, item)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{item} {name}")
    assert _eval_rows(workdir) == _eval_rows(selected)


@pytest.mark.slow
def test_patience_stops_the_run_and_a_rerun_is_a_no_op(prepared, tmp_path):
    """Learning rate 0: every validation loss ties the first, so patience 2 stops at the 3rd evaluation,
    step 9, which is not a checkpoint step (every 4): it is saved all the same, so the rerun stops at once."""
    workdir = str(tmp_path / "patient")
    flags = ("--config.valid_metric=loss", "--config.eval_every=3", "--config.patience=2",
             "--config.learning_rate=0")  # fmt: skip
    err = runs.run(workdir, prepared, *flags)
    assert (
        "early stop at step 9: validation nll has not improved for 2 evaluations; the best is step 3" in err
    )
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert "9" in before and str(STEPS) not in before
    err = runs.run(workdir, prepared, *flags)
    assert "resumed from the checkpoint at step 9" in err and "early stop at step 9" in err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.slow
def test_values_changed_on_disk_are_caught_by_the_checksums(reference, prepared, tmp_path):
    """The newest checkpoint's params rewritten with one weight changed (what bytes flipped inside an
    uncompressed chunk do: the files read cleanly, the numbers are wrong): eval.py reads the previous
    step instead, and train.py moves it aside and redoes the steps, ending as the reference."""
    workdir = str(tmp_path / "changed")
    shutil.copytree(reference, workdir)
    path = os.path.join(workdir, "checkpoints", str(STEPS), "params")
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(path)
    leaf = jax.tree_util.tree_leaves_with_path(params)[0][0]
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[(0,) * x.ndim].add(1.0) if p == leaf else x, params
    )
    shutil.rmtree(path)
    ckptr.save(path, params)
    ckptr.wait_until_finished()
    proc = runs.script("eval.py", f"--workdir={workdir}", f"--config.data_dir={prepared[0]}",
                       "--beam_size=1", "--max_examples=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"is unreadable (ValueError: the checksum of params" in proc.stderr
    assert json.loads(open(next(_eval_json(workdir))).read())["checkpoint_step"] == STEPS - runs.EVERY
    err = runs.run(workdir, prepared)
    assert f"moved it to {STEPS}.corrupt-" in err
    final = runs.final_params(workdir)
    for name, value in runs.final_params(reference).items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


@pytest.mark.slow
def test_reading_weights_in_another_dtype_is_not_taken_for_damage(reference, prepared, tmp_path):
    """orbax casts on restore (fp32 saved, bf16 asked): the checksums skip what they cannot compare."""
    out = str(tmp_path / "bf16")
    flags = (f"--workdir={reference}", f"--config.data_dir={prepared[0]}", f"--output_dir={out}",
             "--config.model.overrides.param_dtype=bfloat16", "--beam_size=1",
             "--max_examples=2")  # fmt: skip
    proc = runs.script("eval.py", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"unreadable" not in proc.stderr and f"(step {STEPS})".encode() in proc.stdout
