"""Shared by the benchmarks: timing with a device sync, versions, and one JSON line per result."""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import time

import jax


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
