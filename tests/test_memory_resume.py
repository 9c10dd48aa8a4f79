"""Training with Transformer-XL memory survives kill -9 and SIGTERM: train.py runs as real processes
(tests/memory_config.py on the fixture's Bible chapters) and a rerun after either equals the
uninterrupted run bit for bit: losses, final params and the final memory itself."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import runs

pytestmark = pytest.mark.slow

STEPS = 12
SEED = int(os.environ.get("FAULT_SEED", random.SystemRandom().randrange(10**6)))


def _start(workdir, data_dir, reference=None):
    """train.py on `workdir`; with `reference`, its tokenizer and token cache are copied in first."""
    os.makedirs(workdir, exist_ok=True)
    if reference is not None and not os.path.exists(os.path.join(workdir, "spm.model")):
        for name in ("spm.model", "spm.model.options.json"):
            shutil.copy(os.path.join(reference, name), workdir)
        shutil.copytree(os.path.join(reference, "tokens"), os.path.join(workdir, "tokens"))
    command = [
        sys.executable, "train.py", "--config=tests/memory_config.py", f"--workdir={workdir}",
        f"--config.data_dir={data_dir}", f"--config.num_train_steps={STEPS}", "--config.checkpoint_every=4",
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=runs.ROOT, env=runs.environment(devices=1), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_runs")
    data_dir, workdir = str(root / "tfds"), str(root / "reference")
    runs.finish(_start(workdir, data_dir))
    return data_dir, workdir


def _item(workdir, name):
    path = os.path.join(workdir, "checkpoints", str(STEPS), name)
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
        ckptr.restore(path, target))}  # fmt: skip


def _assert_same_run(workdir, reference, why):
    why = f"{why} (rerun with FAULT_SEED={SEED})"
    got, want = runs.curve(workdir), runs.curve(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want, why
    for name in ("params", "memory"):
        got_item, want_item = _item(workdir, name), _item(reference, name)
        assert sorted(got_item) == sorted(want_item)
        for key, value in want_item.items():
            np.testing.assert_array_equal(got_item[key], value, err_msg=f"{name} {key} {why}")


def _interrupt(workdir, data_dir, reference, sig, after):
    proc = _start(workdir, data_dir, reference)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + runs.TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= after:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    runs.finish(proc, expect_ok=False)
    assert proc.returncode != 0, f"the run ended before the signal after step {after}"
    runs.finish(_start(workdir, data_dir, reference))  # the user's recovery: rerun the same command


def test_the_memory_is_checkpointed(reference):
    memory = _item(reference[1], "memory")
    doc_ids = [v for k, v in memory.items() if "doc_ids" in k]
    assert doc_ids and all((d > 0).all() for d in doc_ids)  # rows of real documents, not empty slots
    assert json.load(open(os.path.join(reference[1], "final_metrics.json")))["perplexity"] > 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_rerun_after_an_interruption_equals_the_uninterrupted_run(reference, tmp_path, sig):
    data_dir, ref = reference
    after = random.Random(SEED).randrange(2, STEPS - 2)
    _interrupt(str(tmp_path / "run"), data_dir, ref, sig, after)
    _assert_same_run(str(tmp_path / "run"), ref, f"{signal.Signals(sig).name} after step {after}")
