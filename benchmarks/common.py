"""Shared by the benchmarks: timing with a device sync, versions, and one JSON line per result."""

from __future__ import annotations

import collections
import glob
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds per call of `fn(*args)`, waiting for the device each time (compile excluded)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment() -> dict:
    import flax
    import optax

    device = jax.devices()[0]
    return {
        "device": f"{jax.device_count()} x {device.device_kind}",
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }


def done_keys(path: str) -> set[str]:
    """The "key" of every row already in the JSON-lines file `path` (none if it does not exist): what a
    resumable sweep skips."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["key"] for line in f if line.strip()}


def append_row(path: str, row: dict) -> None:
    """Append `row` to the JSON-lines file `path` as one line."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def load_config(path: str):
    """get_config() of an ml_collections config file (as --config= would load it)."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def report(name: str, **figures) -> dict:
    row = {"benchmark": name, **figures, **environment()}
    print(json.dumps(row), flush=True)
    return row


def synthetic_batch(task, batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    """Full rows of random tokens (no padding), one sequence per row, in the pipeline's format."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in task.features:
        out[name] = rng.integers(3, vocab, (batch, length), dtype=np.int32)
        out[f"{name}_segment_ids"] = np.ones((batch, length), np.int32)
        out[f"{name}_positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    return out


def xla_op_profile(run, folder: str, steps: int) -> collections.Counter:
    """Milliseconds per call of `run` (which must block) by compiled XLA op (`hlo_op` of XLA CPU's
    thunk events), from a jax.profiler trace of `steps` calls written under `folder`."""
    before = set(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))
    with jax.profiler.trace(folder):
        for _ in range(steps):
            run()
    (path,) = set(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)) - before
    per_op = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op:
                    per_op[op] += event.duration_ns / 1e6 / steps
    return per_op
