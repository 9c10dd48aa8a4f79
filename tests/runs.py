"""Real train.py processes on the committed fixture, for the fault, scale-out and CLI tests.

Every run has the same tiny config (padded batches, an 8-device data x FSDP mesh, async
checkpoints every EVERY steps), and `reference` is its uninterrupted run, made once per session.
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from flaxformer_lite.train import experiment
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 24, 4
TIMEOUT = 240  # seconds for any one run


@contextlib.contextmanager
def locked(path):
    """An exclusive lock shared by all pytest-xdist workers (for work done once per session)."""
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def prepared(session_dir):
    """(tfds data dir, spm.model) built once per session, shared by all runs and workers."""
    root = session_dir / "faults"
    with locked(root):
        if not (root / "prep" / "spm.model").exists():
            config = tiny_config.get_config()
            config.data_dir = str(root / "tfds")
            exp = experiment.build(config, str(root / "prep"))  # prepares the data, trains spm.model
            exp.token_cache(config.train_split)  # and tokenizes the train split (copied into each run)
    return str(root / "tfds"), str(root / "prep" / "spm.model")


@pytest.fixture(scope="session")
def reference(prepared, session_dir):
    """The uninterrupted single-process run, done once per session."""
    workdir = str(session_dir / "faults" / "reference")
    with locked(workdir):
        if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
            run(workdir, prepared)
    return workdir


def command(workdir, prepared, *extra):
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


def environment(devices=8, **extra):
    """The child's environment: CPU only, `devices` fake devices, plus `extra` variables."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    cache = dict(  # the runs compile the same programs: compile once per session, load after
        JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "flaxformer_lite_test_jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **cache, **extra)


def start(workdir, prepared, *extra, devices=8, **variables):
    """Start train.py (through the fault runner) on `workdir` with the shared data and tokenizer."""
    os.makedirs(workdir, exist_ok=True)
    if not os.path.exists(os.path.join(workdir, "spm.model")):
        os.link(prepared[1], os.path.join(workdir, "spm.model"))
    tokens = os.path.join(os.path.dirname(prepared[1]), "tokens")
    if not os.path.exists(os.path.join(workdir, "tokens")):
        shutil.copytree(tokens, os.path.join(workdir, "tokens"))
    return subprocess.Popen(
        command(workdir, prepared, *extra),
        cwd=ROOT,
        env=environment(devices, **variables),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, expect_ok=True):
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    if expect_ok:
        assert proc.returncode == 0, err[-3000:]
    return err


def run(workdir, prepared, *extra, **variables):
    """A whole run that must succeed; returns its stderr."""
    return finish(start(workdir, prepared, *extra, **variables))


def curve(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def final_params(workdir):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(STEPS), "params")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever topology wrote it
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta)
    params = ckptr.restore(path, target)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(params).items()}


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


def script(*command, stdin=None):
    """eval.py / generate.py (or "-m", module) with the tiny config and `command`'s flags, to the end."""
    program, flags = (command[:2], command[2:]) if command[0] == "-m" else (command[:1], command[1:])
    return subprocess.run(
        [sys.executable, *program, "--config=tests/tiny_config.py", *flags],
        cwd=ROOT, env=environment(), input=stdin, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
