"""Strict JAX settings and 8 fake CPU devices for every test (set before JAX initialises)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


import contextlib  # noqa: E402
import fcntl  # noqa: E402

import pytest  # noqa: E402


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
def session_dir(tmp_path_factory, worker_id):
    """A directory shared by every xdist worker of this session (the per-worker base otherwise)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base
