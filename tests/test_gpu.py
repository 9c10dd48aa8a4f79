"""The GPU tier: run on a lent GPU by benchmarks/device_check.py (JAX_PLATFORMS=cuda,cpu).

- cuDNN flash attention on packed rows (segment ids, causal, bf16) against the numpy reference.
- A tiny translation train step on the GPU against the same step on the CPU, fp32, highest precision.

Skipped on a machine without a GPU, except in the device check's dry run
(FLAXFORMER_GPU_DRY_RUN=1), which runs the same comparisons with the CPU standing in for the GPU and
the XLA path for cuDNN, so that the tier cannot rot before a GPU is lent.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import synthetic_batch
from flaxformer_lite import ops
from flaxformer_lite.train import experiment
from tests import reference, tiny_config

DRY_RUN = bool(os.environ.get("FLAXFORMER_GPU_DRY_RUN"))
HAS_GPU = (
    any(d.platform == "gpu" for d in jax.devices())
    if "cuda" in os.environ.get("JAX_PLATFORMS", "")
    else False
)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_GPU or DRY_RUN), reason="needs a GPU (benchmarks/device_check.py runs it)"),
]


def _device():
    return jax.devices("gpu")[0] if HAS_GPU else jax.devices("cpu")[0]


def test_cudnn_packed_attention_matches_the_reference():
    B, T, N, H = 2, 256, 4, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, N, H)).astype(np.float32) for _ in range(3))
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:230] = 1, 2  # two sequences, then padding
    seg[1, :] = 1
    impl = "cudnn" if HAS_GPU else "xla"
    args = [jax.device_put(jnp.asarray(x, jnp.bfloat16), _device()) for x in (q, k, v)]
    got = ops.dot_product_attention(
        *args, is_causal=True, segment_ids=jnp.asarray(seg), max_segments=4, implementation=impl
    )
    causal = np.tril(np.ones((T, T), bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & causal
    with np.errstate(invalid="ignore"):  # padding rows attend to nothing: NaN in the reference
        want = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), mask=mask[:, None])
    real = seg > 0  # padding rows are not compared (any value there is ignored downstream)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], want[real], atol=3e-2, rtol=3e-2)


def _step(device):
    config = tiny_config.get_config()
    config.model.overrides.dtype = "float32"
    config.model.overrides.dropout_rate = 0.0
    config.mesh_data = 1
    exp = experiment.build(config, None, tokenizer="none", vocab_size=97, devices=[device])
    state, shardings = exp.init_state(jax.random.key(0))
    batch = synthetic_batch(exp.task, config.batch_size, config.max_length, 97)
    batch = {k: jax.device_put(v, device) for k, v in batch.items()}
    with jax.set_mesh(exp.mesh), jax.default_matmul_precision("highest"):
        state, metrics = exp.train_step(shardings)(state, batch, jax.random.key(1))
    return float(metrics["loss"]), jax.tree.map(np.asarray, state.params)


def test_a_train_step_on_the_gpu_equals_the_cpu_step_in_fp32():
    loss_gpu, params_gpu = _step(_device())
    loss_cpu, params_cpu = _step(jax.devices("cpu")[0])
    assert np.isfinite(loss_gpu) and abs(loss_gpu - loss_cpu) <= 1e-4 * abs(loss_cpu)
    for a, b in zip(jax.tree.leaves(params_gpu), jax.tree.leaves(params_cpu), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
