import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import ops
from tests import reference

B, T, S, H = 2, 7, 11, 6  # distinct primes-ish so a swapped axis cannot pass


def _qkv(n_heads, kv_heads, t=T, s=S, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, t, n_heads, H), dtype)
    k = jax.random.normal(kk, (B, s, kv_heads, H), dtype)
    v = jax.random.normal(kv, (B, s, kv_heads, H), dtype)
    return q, k, v


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])  # MHA, GQA, MQA
def test_matches_numpy_with_mask_and_bias(impl, heads, kv_heads):
    q, k, v = _qkv(heads, kv_heads)
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (B, 1, T, S)).at[..., 0].set(True)
    bias = jax.random.normal(jax.random.key(2), (1, heads, T, S))
    out = ops.dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=impl)
    np.testing.assert_allclose(out, reference.attention(q, k, v, mask, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_causal_segments_and_window_match_numpy(impl):
    q, k, v = _qkv(4, 2, t=T, s=T)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
    out = ops.dot_product_attention(
        q, k, v, is_causal=True, segment_ids=seg, local_window=3, implementation=impl
    )
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    seg_np = np.asarray(seg)
    mask = (j <= i) & (i - j < 3) & (seg_np[:, :, None] == seg_np[:, None, :])
    expected = reference.attention(q, k, v, mask[:, None]) * (seg_np != 0)[:, :, None, None]  # 0 at padding
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_close_to_float64_reference():
    q, k, v = _qkv(4, 2, dtype=jnp.bfloat16)
    out = ops.dot_product_attention(q, k, v, implementation="xla")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), reference.attention(q, k, v), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_future_tokens_never_change_earlier_outputs(impl):
    q, k, v = _qkv(4, 2, t=T, s=T)
    out = ops.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    t0 = 4
    k2 = k.at[:, t0:].set(jax.random.normal(jax.random.key(9), k[:, t0:].shape))
    v2 = v.at[:, t0:].set(100.0)
    out2 = ops.dot_product_attention(q, k2, v2, is_causal=True, implementation=impl)
    np.testing.assert_array_equal(out[:, :t0], out2[:, :t0])
    assert not np.allclose(out[:, t0:], out2[:, t0:])


def test_padding_content_never_changes_real_outputs():
    q, k, v = _qkv(4, 4, t=S, s=S)
    seg = jnp.array([[1] * 8 + [0] * 3, [1] * 11])
    out = ops.dot_product_attention(q, k, v, segment_ids=seg)
    k2 = k.at[0, 8:].set(50.0)
    v2 = v.at[0, 8:].set(-50.0)
    out2 = ops.dot_product_attention(q, k2, v2, segment_ids=seg)
    np.testing.assert_array_equal(out[0, :8], out2[0, :8])
    np.testing.assert_array_equal(out[1], out2[1])
    assert np.all(np.isfinite(out2))  # padding queries see padding keys, never an empty row


def test_packed_segments_equal_separate_sequences():
    q, k, v = _qkv(4, 2, t=T, s=T)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]] * B)
    packed = ops.dot_product_attention(q, k, v, is_causal=True, segment_ids=seg)
    first = ops.dot_product_attention(q[:, :3], k[:, :3], v[:, :3], is_causal=True)
    second = ops.dot_product_attention(q[:, 3:], k[:, 3:], v[:, 3:], is_causal=True)
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), rtol=1e-6, atol=1e-6)


def test_cross_attention_segment_ids():
    q, k, v = _qkv(4, 2)
    q_seg = jnp.array([[1, 1, 1, 1, 2, 2, 2]] * B)
    kv_seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 2] * B)
    out = ops.dot_product_attention(q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg)
    mask = np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :]
    np.testing.assert_allclose(out, reference.attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_mask_builders():
    pos = jnp.array([[0, 1, 2, 3]])
    np.testing.assert_array_equal(ops.causal_mask(pos, pos)[0, 0], np.tril(np.ones((4, 4), bool)))
    window = ops.sliding_window_mask(pos, pos, 2)[0, 0]
    np.testing.assert_array_equal(window, np.abs(np.subtract.outer(range(4), range(4))) < 2)
    pad = ops.padding_mask(jnp.array([[1, 1, 0]]) > 0, jnp.array([[1, 0]]) > 0)[0, 0]
    np.testing.assert_array_equal(pad, [[1, 0], [1, 0], [0, 0]])
    assert ops.combine_masks(None, None) is None
    combined = ops.combine_masks(ops.causal_mask(pos, pos), None, ops.sliding_window_mask(pos, pos, 2))
    np.testing.assert_array_equal(combined[0, 0], np.tril(np.ones((4, 4), bool)) & np.asarray(window))


def test_dropout_is_inverted_and_seeded():
    q, k, v = _qkv(4, 4)
    rng = jax.random.key(3)
    a = ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng)
    b = ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, ops.dot_product_attention(q, k, v))
    # Averaged over many masks, inverted dropout is unbiased: E[out] = attention without dropout.
    rngs = jax.random.split(jax.random.key(4), 1000)
    mean = jax.vmap(lambda r: ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=r))(rngs).mean(
        0
    )
    np.testing.assert_allclose(mean, ops.dot_product_attention(q, k, v), atol=0.1)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(3, 2)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        ops.dot_product_attention(q, k, v)
    q, k, v = _qkv(4, 2)
    with pytest.raises(ValueError, match="implementation"):
        ops.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="attention dropout needs"):
        ops.dot_product_attention(
            q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0), implementation="xla"
        )


@pytest.mark.parametrize("impl,masked", [("xla", False), ("xla", True), ("reference", True)])
def test_scale_replaces_one_over_sqrt_head_dim(impl, masked):
    """scale=1.0 (T5) on every path, against the float64 reference fed sqrt(H)-scaled queries."""
    q, k, v = _qkv(4, 2)
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (B, 1, T, S)).at[..., 0].set(True) if masked else None
    out = ops.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=impl)
    expected = reference.attention(np.asarray(q, np.float64) * np.sqrt(H), k, v, mask)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    cached = ops.cached_attention(
        q, jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)), mask=mask, scale=1.0
    )
    np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)
