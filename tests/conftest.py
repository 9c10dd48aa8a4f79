"""Strict JAX settings and 8 fake CPU devices for every test (set before JAX initialises)."""

import os
import tempfile

# Tiny models: compiling dominates, so XLA's CPU back end skips its LLVM optimisations (init of a
# tiny EncoderDecoder compiles in 1.1 s instead of 2.7 s). Subprocess runs inherit the flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same tiny programs (in both xdist workers and in the train.py processes they
# start, tests/runs.py): compile each once per machine and load it after that.
jax.config.update(
    "jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "flaxformer_lite_test_jax_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


import pytest  # noqa: E402

from tests.runs import prepared, reference  # noqa: E402, F401  (session fixtures: real train.py runs)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory, worker_id):
    """A directory shared by every xdist worker of this session (the per-worker base otherwise)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base
