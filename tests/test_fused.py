"""Fused attention for packed batches, proven without an accelerator.

- `segment_layout` (segment ids -> cuDNN lengths/offsets) against a numpy loop.
- Splash attention in Pallas interpret mode against `reference_attention` and numpy, fwd + grads.
- The full train step of wmt_base, gpt2_small and llama_small lowered for cuda and tpu on CPU: the
  module must call the fused kernel and hold no [.., T, S] tensor (no dense mask or bias).
"""

import dataclasses
import importlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_api

from flaxformer_lite import ops, sharding
from flaxformer_lite.config import tiny
from flaxformer_lite.data import pipeline
from flaxformer_lite.model import models
from flaxformer_lite.ops import fused
from flaxformer_lite.train import experiment, training
from tests import reference


def _layout_numpy(seg, M):
    """Loop reference: seqlens [B, M] and offsets [B, M + 1], -1 where unused."""
    B, T = seg.shape
    lengths = -np.ones((B, M), np.int64)
    offsets = -np.ones((B, M + 1), np.int64)
    for b in range(B):
        for j in range(M):
            where = np.flatnonzero(seg[b] == j + 1)
            if where.size:
                lengths[b, j], offsets[b, j] = where.size, where[0]
    return lengths, offsets


def test_segment_layout_matches_numpy():
    seg = np.array(
        [
            [1] * 13,  # one sequence filling the row
            [1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 5, 0, 0],  # many, then padding
            [0] * 13,  # padding only
            [1] * 5 + [2] * 6 + [0] * 2,
        ],
        np.int32,
    )
    for M in (5, 7):
        lengths, offsets = ops.segment_layout(jnp.asarray(seg), M)
        want_len, want_off = _layout_numpy(seg, M)
        np.testing.assert_array_equal(lengths, want_len)
        np.testing.assert_array_equal(offsets, want_off)
    # jax's own packed-layout example: 3 segments of 1 token and 2 of 1 token.
    lengths, offsets = ops.segment_layout(jnp.array([[1, 2, 3], [1, 2, 0]]), 3)
    np.testing.assert_array_equal(offsets, [[0, 1, 2, -1], [0, 1, -1, -1]])
    np.testing.assert_array_equal(lengths, [[1, 1, 1], [1, 1, -1]])


def _qkv(B, T, S, N, K, H, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, T, N, H)),
        jax.random.normal(kk, (B, S, K, H)),
        jax.random.normal(kv, (B, S, K, H)),
    )


def _packed(B, T, cuts, seed=0):
    """Rows of contiguous ids 1.. with sequence ends at `cuts[b]`, padding after the last cut."""
    seg = np.zeros((B, T), np.int32)
    for b, ends in enumerate(cuts):
        start = 0
        for j, end in enumerate(ends):
            seg[b, start:end] = j + 1
            start = end
    return jnp.asarray(seg)


def _check_splash(q, k, v, expected_mask, *, fwd_tol=1e-5, grad_tol=1e-4, **kwargs):
    """Splash (interpret) vs the einsum reference with the same constraints, fwd and grads.

    The reference gets the constraints as one dense mask; padding queries are 0 in both.
    """

    def splash(q, k, v):
        return ops.dot_product_attention(q, k, v, implementation="splash_interpret", **kwargs)

    def ref(q, k, v):
        out = ops.reference_attention(q, k, v, mask=expected_mask)
        seg = kwargs.get("segment_ids")
        return out if seg is None else out * (seg != 0)[:, :, None, None]

    out, want = jax.jit(splash)(q, k, v), jax.jit(ref)(q, k, v)
    np.testing.assert_allclose(out, want, atol=fwd_tol, rtol=fwd_tol)
    # and the reference itself against numpy (float64), so neither shares a bug with the other
    seg = kwargs.get("segment_ids")
    with np.errstate(invalid="ignore"):  # padding queries with no padding key: NaN rows, zeroed below
        numpy_ref = reference.attention(q, k, v, expected_mask)
    if seg is not None:
        numpy_ref = np.where(np.asarray(seg != 0)[:, :, None, None], numpy_ref, 0)  # rows may be all-masked
    np.testing.assert_allclose(want, numpy_ref, atol=1e-5, rtol=1e-5)
    w = jax.random.normal(jax.random.key(7), out.shape)  # a random cotangent
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
    grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    grads_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=grad_tol, rtol=grad_tol)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_splash_packed_causal_matches_reference(heads, kv_heads):
    B, T, H = 2, 256, 16
    q, k, v = _qkv(B, T, T, heads, kv_heads, H)
    seg = _packed(B, T, [[100, 200, 250], [256]])
    s = np.asarray(seg)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (j <= i) & (s[:, :, None] == s[:, None, :])
    _check_splash(q, k, v, jnp.asarray(mask[:, None]), is_causal=True, segment_ids=seg)


def test_splash_in_bfloat16_under_highest_precision_keeps_its_gradients():
    """bf16 splash runs its kernels at the default matmul precision (the tests set "highest", which
    Mosaic rejects for 16-bit dots: "Bad lhs type" at TPU compile); forward and gradients through
    that custom VJP still match the fp32 reference on the same bf16 inputs, segment ids included."""
    assert jax.config.jax_default_matmul_precision == "highest"
    B, T, H = 2, 256, 16
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(B, T, T, 4, 2, H, seed=3))
    seg = _packed(B, T, [[100, 200, 250], [256]])
    s = np.asarray(seg)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = jnp.asarray(((j <= i) & (s[:, :, None] == s[:, None, :]))[:, None])
    w = jax.random.normal(jax.random.key(7), (B, T, 4, H))

    def splash(q, k, v):
        out = ops.dot_product_attention(
            q, k, v, implementation="splash_interpret", is_causal=True, segment_ids=seg
        )
        return jnp.sum(out.astype(jnp.float32) * w)

    def ref(q, k, v):
        out = ops.reference_attention(q, k, v, mask=mask) * (seg != 0)[:, :, None, None]
        return jnp.sum(out * w)

    grads = jax.jit(jax.grad(splash, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(*(x.astype(jnp.float32) for x in (q, k, v)))
    for g, g_ref in zip(grads, want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), g_ref, atol=6e-2, rtol=6e-2)


def test_splash_cross_attention_with_different_segments():
    """Decoder (T=128) over encoder (S=256) rows packing the same three pairs at other lengths."""
    B, T, S = 2, 128, 256
    q, k, v = _qkv(B, T, S, 4, 2, 16, seed=1)
    q_seg = _packed(B, T, [[30, 70, 100], [128]])
    kv_seg = _packed(B, S, [[90, 150, 256], [200]])
    mask = np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    _check_splash(q, k, v, jnp.asarray(mask[:, None]), segment_ids=q_seg, kv_segment_ids=kv_seg)


def test_splash_local_window_matches_reference():
    B, T, W = 1, 256, 37
    q, k, v = _qkv(B, T, T, 4, 2, 16, seed=2)
    seg = _packed(B, T, [[150, 256]])
    s = np.asarray(seg)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (j <= i) & (i - j < W) & (s[:, :, None] == s[:, None, :])
    _check_splash(q, k, v, jnp.asarray(mask[:, None]), is_causal=True, segment_ids=seg, local_window=W)


def test_splash_in_a_packed_encoder_decoder_equals_xla():
    """The whole model (self, causal and cross attention) under a mesh: splash == XLA path."""
    cfg = tiny(max_len=128, num_heads=4, num_kv_heads=2, head_dim=8)
    T = 128
    src = _packed(2, T, [[40, 90, 128], [70]])
    tgt = _packed(2, T, [[50, 80, 110], [60]])
    tokens = lambda seg, seed: jnp.where(  # noqa: E731
        seg > 0, jax.random.randint(jax.random.key(seed), seg.shape, 4, cfg.vocab_size), 0
    )
    args = (tokens(src, 0), tokens(tgt, 1))
    kwargs = dict(inputs_segment_ids=src, decoder_segment_ids=tgt)
    model = models.EncoderDecoder(cfg.replace(deterministic=True, attention_impl="xla"))
    params = model.init(jax.random.key(0), *args, **kwargs)["params"]
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])  # heads split too
    outputs = {}
    for impl in ("xla", "splash_interpret"):
        m = models.variant(model, attention_impl=impl)
        with jax.set_mesh(mesh):
            outputs[impl] = jax.jit(lambda p, m=m: m.apply({"params": p}, *args, **kwargs))(params)
    valid = np.asarray(tgt != 0)
    np.testing.assert_allclose(
        outputs["splash_interpret"][valid], outputs["xla"][valid], atol=2e-5, rtol=2e-5
    )


def test_choose_implementation_per_backend():
    choose = lambda backend, **kw: ops.choose_implementation(  # noqa: E731
        backend, **{"dtype": jnp.bfloat16, "head_dim": 64, "q_len": 256, "kv_len": 256, **kw}
    )[0]
    assert choose("gpu") == "cudnn"
    assert choose("gpu", dtype=jnp.float32) == "xla"  # cuDNN flash is bf16/fp16 only
    assert choose("gpu", head_dim=12) == "xla"
    assert choose("gpu", has_bias=True) == "xla"  # relative/ALiBi positions
    assert choose("gpu", has_mask=True) == "xla"  # KV-cache decoding
    assert choose("gpu", packed=True) == "cudnn"
    assert choose("gpu", packed=True, packed_on_cudnn=False) == "xla"  # pre-Hopper
    assert choose("gpu", packed_on_cudnn=False) == "cudnn"  # unpacked rows: any cuDNN GPU
    assert choose("gpu", bidirectional_window=True) == "xla"  # cuDNN windows are left-only
    assert choose("tpu", bidirectional_window=True) == "splash"
    assert choose("tpu") == "splash"
    assert choose("tpu", q_len=64) == "xla"  # splash blocks are multiples of 128
    assert choose("tpu", has_bias=True) == "xla"
    assert choose("cpu") == "xla"
    assert choose("gpu", dropout=True) == "reference"
    assert choose("cpu", requested="splash") == "splash"
    assert choose("gpu", requested="xla") == "xla"


def test_splash_mesh_axes_are_those_of_the_rule_table():
    rules = dict(sharding.DEFAULT_RULES)
    assert tuple(rules[sharding.BATCH]) == fused.BATCH_MESH_AXES
    assert rules[sharding.HEADS] == rules[sharding.KV_HEADS] == fused.HEAD_MESH_AXIS


def test_packer_caps_sequences_per_row_and_numbers_them_contiguously():
    class Tok:  # 2-token "sentences" so that up to 8 fit a 16-token row
        keys = ("targets",)
        stats = None

        def __call__(self, ex):
            return {"targets": np.array([5, 1], np.int32)}

        def keep(self, ex):
            return True

    ds = pipeline.make_dataset(
        list(range(64)), Tok(), batch_size=4, max_length=16, max_segments=3, shuffle=False, num_epochs=1
    )
    rows = np.concatenate([b["targets_segment_ids"] for b in ds])
    assert rows.max() == 3
    for row in rows:
        ids = row[row > 0]
        assert list(np.unique(ids)) == list(range(1, ids.max() + 1))
        assert np.all(np.diff(ids) >= 0)  # contiguous, in order
        assert np.all(row[len(ids) :] == 0)  # padding only at the end


# ---- lowering for GPU and TPU on a CPU-only machine


def _lowered_train_step(name: str, platform: str, num_devices: int) -> tuple[str, int, int]:
    """(StableHLO text, B, T) of the config's full jitted train step on packed batches, for
    `platform`, over a data-parallel mesh of `num_devices` of the tests' CPU devices."""
    config = importlib.import_module(f"configs.{name}").get_config()
    # At wmt_base's own T=128 (and 256) a [.., T, T] tensor could be splash's 128-lane residuals or
    # the [T, d_model / 2] sinusoid table; at 384 it can only be a mask or bias.
    T = 384 if config.max_length == 128 else config.max_length
    B = jax.device_count()  # build() checks the batch against the 8-device mesh
    config.batch_size, config.max_length = B, T
    config.model.overrides.attention_impl = {"cuda": "cudnn", "tpu": "splash"}[platform]
    config.model.overrides.dtype = "bfloat16"
    exp = experiment.build(config, None, tokenizer="none", vocab_size=512)
    exp = dataclasses.replace(exp, mesh=sharding.make_mesh(devices=jax.devices()[:num_devices]))
    state, shardings = training.state_shardings(exp.model, exp.tx, exp.task, exp.batch_shape, exp.mesh)
    batch = {key: jax.ShapeDtypeStruct((B, T), jnp.int32) for key in exp.task.example_batch(B, T)}
    assert any(key.endswith("_segment_ids") for key in batch)  # packed: segment ids in every batch
    step = exp.train_step(shardings)
    with jax.set_mesh(exp.mesh):
        lowered = step.trace(state, batch, jax.random.key(0)).lower(lowering_platforms=(platform,))
    return lowered.as_text(), B, T


def _quadratic_tensors(text: str, T: int) -> set[str]:
    return set(re.findall(rf"tensor<(?:\d+x)*{T}x{T}x\w+>", text))


@pytest.mark.parametrize("name", ["wmt_base", "wmt_big", "gpt2_small", "llama_small"])
def test_train_step_lowers_to_cudnn_flash_attention_for_cuda(name):
    """cuDNN's trace-time checks need a GPU, so check_cudnn_version and check_compute_capability
    are stubbed (cuDNN 9.10, Hopper) to lower on CPU. Numerics are NOT checked here: this proves
    which kernel the GPU step calls and that no dense mask reaches it, nothing more. One device:
    under a multi-device mesh jax wraps the cuDNN call in custom_partitioning, whose body appears
    only when compiling for a GPU."""
    with (
        mock.patch.object(cudnn_api, "check_cudnn_version", lambda: 91000),
        mock.patch.object(cudnn_api, "check_compute_capability", lambda capability: True),
    ):
        text, B, T = _lowered_train_step(name, "cuda", 1)
    calls = re.findall(r"custom_call @__cudnn\$(fmha\w*)\((.*)", text)
    assert {c for c, _ in calls} >= {"fmhaSoftmax", "fmhaSoftmaxBackward"}
    assert not _quadratic_tensors(text, T)
    cfg = experiment.model_config(importlib.import_module(f"configs.{name}").get_config(), 512)
    for _, rest in calls:  # operands: q, k, v, then packed lengths [B, M] and offsets [B, M + 1]
        types = re.findall(r"tensor<([\dx]+)x\w+>", rest.split(" : (")[-1].split(") ->")[0])
        assert types[1] == f"{B}x{T}x{cfg.num_heads}x{cfg.head_dim}"  # K/V repeated to N (GQA fix)
        assert f"{B}x{cfg.max_segments}" in types and f"{B}x{cfg.max_segments + 1}" in types


@pytest.mark.parametrize("name", ["wmt_base", "wmt_big", "gpt2_small", "llama_small"])
def test_train_step_lowers_to_splash_attention_for_tpu(name):
    text, B, T = _lowered_train_step(name, "tpu", jax.device_count())  # splash under shard_map
    assert "tpu_custom_call" in text
    assert not _quadratic_tensors(text, T)
    assert "cudnn" not in text
