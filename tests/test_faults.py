"""Faults and scale-out, with train.py run as real processes on the committed Bible fixture.

Every run here has the same tiny config (padded batches, an 8-device data x FSDP mesh, async
checkpoints every 4 steps), so each must reproduce the uninterrupted single-process run: after
a kill -9 (between steps, or inside a checkpoint commit) and a plain rerun, bit for bit; on 2
processes x 4 devices, to float round-off. Kill points are random; a failure names its seed and
FAULT_SEED=<n> reruns it.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxformer_lite import experiment
from tests import tiny_config
from tests.conftest import locked

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 24, 4
SEED = int(os.environ.get("FAULT_SEED", random.SystemRandom().randrange(10**6)))
TIMEOUT = 240  # seconds for any one run


@pytest.fixture(scope="module")
def prepared(session_dir):
    """(tfds data dir, spm.model) built once per session, shared by all runs and workers."""
    root = session_dir / "faults"
    with locked(root):
        if not (root / "prep" / "spm.model").exists():
            config = tiny_config.get_config()
            config.data_dir = str(root / "tfds")
            experiment.tokenizer(config, str(root / "prep"))
    return str(root / "tfds"), str(root / "prep" / "spm.model")


def _command(workdir, prepared, *extra):
    return [
        sys.executable,
        "-m",
        "tests.fault_runner",
        "--config=tests/tiny_config.py",
        f"--workdir={workdir}",
        f"--config.data_dir={prepared[0]}",
        f"--config.num_train_steps={STEPS}",
        f"--config.checkpoint_every={EVERY}",
        "--config.pack=False",  # padded rows: a step's batch does not depend on the host count
        "--config.mesh_data=2",
        "--config.mesh_fsdp=4",
        "--config.async_checkpoints=True",
        "--config.bleu_examples=0",
        "--config.eval_batches=1",
        *extra,
    ]


def _env(devices=8, **extra):
    flags = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)


def _start(workdir, prepared, *extra, devices=8, **env):
    os.makedirs(workdir, exist_ok=True)
    if not os.path.exists(os.path.join(workdir, "spm.model")):
        os.link(prepared[1], os.path.join(workdir, "spm.model"))
    return subprocess.Popen(
        _command(workdir, prepared, *extra),
        cwd=ROOT,
        env=_env(devices, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, expect_ok=True):
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    if expect_ok:
        assert proc.returncode == 0, err[-3000:]
    return err


def _run(workdir, prepared, *extra, **env):
    return _finish(_start(workdir, prepared, *extra, **env))


def _curve(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _final_params(workdir):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever topology wrote it
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta)
    state = ckptr.restore(path, target)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(state["params"]).items()}


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


@pytest.fixture(scope="module")
def reference(prepared, session_dir):
    """The uninterrupted single-process run, done once per session."""
    workdir = str(session_dir / "faults" / "reference")
    with locked(workdir):
        if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
            _run(workdir, prepared)
    return workdir


def _assert_same_run(workdir, reference, exact=True, why=""):
    why = f"{why} (rerun with FAULT_SEED={SEED})"
    got, want = _curve(workdir), _curve(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    got_params, want_params = _final_params(workdir), _final_params(reference)
    assert sorted(got_params) == sorted(want_params)
    if exact:
        assert got == want, why
        for name, value in want_params.items():
            np.testing.assert_array_equal(got_params[name], value, err_msg=f"{name} {why}")
    else:
        np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)
        for name, value in want_params.items():
            np.testing.assert_allclose(got_params[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_same_seed_and_config_give_identical_runs(prepared, reference, tmp_path):
    _run(str(tmp_path / "again"), prepared)
    _assert_same_run(str(tmp_path / "again"), reference, exact=True)


def test_kill_9_at_a_random_step_then_rerun_equals_the_uninterrupted_run(prepared, reference, tmp_path):
    kill_after = random.Random(SEED).randrange(2, STEPS - 2)
    workdir = str(tmp_path / "killed")
    proc = _start(workdir, prepared, "--config.log_every=1")
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    _finish(proc, expect_ok=False)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill after step {kill_after}"
    _run(workdir, prepared)  # the user's recovery: rerun the same command
    _assert_same_run(workdir, reference, exact=True, why=f"killed after step {kill_after}")


def test_kill_9_inside_a_checkpoint_commit_then_rerun_resumes_from_the_previous_one(
    prepared, reference, tmp_path
):
    step = random.Random(SEED).choice(range(2 * EVERY, STEPS, EVERY))
    workdir = str(tmp_path / "killed_in_commit")
    proc = _start(workdir, prepared, FAULT_KILL_IN_COMMIT_OF_STEP=str(step))
    _finish(proc, expect_ok=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = os.listdir(os.path.join(workdir, "checkpoints"))
    assert str(step) not in ckpts and any(  # the half-made checkpoint is only a temporary directory
        os.path.exists(os.path.join(workdir, "checkpoints", d, "KILLED_HERE")) for d in ckpts
    ), ckpts
    err = _run(workdir, prepared)
    assert f"resumed from the checkpoint at step {step - EVERY}" in err
    _assert_same_run(workdir, reference, exact=True, why=f"killed in the commit of step {step}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_four_devices_each_equal_one_process_with_eight(prepared, reference, tmp_path):
    """Each process reads only its shard; checkpoints are written once and restored by both."""
    workdir = str(tmp_path / "multi")

    def run_both(steps):
        port = _free_port()
        procs = [
            _start(
                workdir,
                prepared,
                f"--config.num_train_steps={steps}",
                "--config.distributed=True",
                f"--config.coordinator_address=127.0.0.1:{port}",
                "--config.num_processes=2",
                f"--config.process_id={i}",
                devices=4,
            )
            for i in range(2)
        ]
        try:
            return [_finish(p) for p in procs]
        finally:
            for p in procs:
                p.kill()

    run_both(STEPS // 2)  # stop half way ...
    first = os.path.join(workdir, "checkpoints", str(STEPS // 2))
    assert sorted(f for f in os.listdir(os.path.join(first, "data")) if f.startswith("process")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]  # one data-iterator position per process, in one checkpoint written once
    errs = run_both(STEPS)  # ... and resume on both processes
    for err in errs:
        assert f"resumed from the checkpoint at step {STEPS // 2}" in err
    _assert_same_run(workdir, reference, exact=False)
