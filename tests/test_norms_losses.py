import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import ops
from tests import reference


def test_layer_norm_and_rms_norm_match_numpy():
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 7)), np.float64) * 3 + 1
    scale = np.linspace(0.5, 2, 7)
    bias = np.linspace(-1, 1, 7)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * scale + bias
    np.testing.assert_allclose(ops.layer_norm(jnp.asarray(x, jnp.float32), scale, bias), want, atol=1e-5)
    want_rms = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(ops.rms_norm(jnp.asarray(x, jnp.float32), scale), want_rms, atol=1e-5)
    assert ops.rms_norm(jnp.asarray(x, jnp.bfloat16), scale).dtype == jnp.bfloat16


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_numpy_one_hot(smoothing):
    B, T, V = 3, 5, 11
    logits = np.asarray(jax.random.normal(jax.random.key(1), (B, T, V))) * 2
    targets = np.asarray(jax.random.randint(jax.random.key(2), (B, T), 0, V))
    weights = (np.arange(T)[None] < np.array([[5], [3], [1]])).astype(np.float32)
    confidence, low = 1 - smoothing, smoothing / (V - 1)
    soft = np.full((B, T, V), low)
    np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
    entropy = -np.sum(np.where(soft > 0, soft * np.log(np.maximum(soft, 1e-30)), 0.0), -1)
    per_token = -(soft * reference.log_softmax(logits)).sum(-1) - entropy
    total, denom = ops.cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), smoothing
    )
    assert float(denom) == 9.0
    np.testing.assert_allclose(total, (per_token * weights).sum(), rtol=1e-5)


def test_cross_entropy_of_bf16_logits_is_float32():
    logits = jax.random.normal(jax.random.key(3), (2, 3, 7)).astype(jnp.bfloat16)
    total, _ = ops.cross_entropy(logits, jnp.zeros((2, 3), jnp.int32))
    assert total.dtype == jnp.float32


def test_accuracy_counts_weighted_argmax_hits():
    logits = jnp.array([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
    correct, denom = ops.accuracy(logits, jnp.array([[1, 1, 1]]), jnp.array([[1, 1, 0]]))
    assert (float(correct), float(denom)) == (1.0, 2.0)


def test_shift_right_plain_and_packed():
    x = jnp.array([[5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(ops.shift_right(x), [[0, 5, 6, 7, 8]])
    seg = jnp.array([[1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(ops.shift_right(x, seg), [[0, 5, 0, 7, 8]])


def test_activations():
    x = jnp.array([-2.0, -0.5, 0.0, 1.5])
    np.testing.assert_allclose(ops.ACTIVATIONS["relu"](x), np.maximum(np.asarray(x), 0))
    erf = np.vectorize(__import__("math").erf)
    np.testing.assert_allclose(
        ops.ACTIVATIONS["gelu"](x), 0.5 * x * (1 + erf(np.asarray(x) / np.sqrt(2))), atol=1e-6
    )
    silu = np.asarray(x) / (1 + np.exp(-np.asarray(x)))
    np.testing.assert_allclose(ops.gated("swiglu", x, 2 * x), silu * 2 * np.asarray(x), atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_losses_values_and_gradient_match_numpy(smoothing):
    """The fused train-step loss: smoothed sum, NLL sum, hits, weights, and its custom gradient
    against numpy: d(loss + 0.3 NLL)/dlogits = w * (softmax - smoothed target + 0.3 (softmax - onehot))."""
    B, T, V = 3, 5, 13
    logits = jax.random.normal(jax.random.key(0), (B, T, V)) * 3
    targets = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    weights = (jax.random.uniform(jax.random.key(2), (B, T)) > 0.3).astype(jnp.float32)
    lp = reference.log_softmax(logits)
    onehot = np.eye(V)[np.asarray(targets)]
    soft = onehot * (1 - smoothing) + (1 - onehot) * smoothing / (V - 1)
    entropy = -np.sum(np.where(soft > 0, soft * np.log(np.maximum(soft, 1e-30)), 0), -1)
    w = np.asarray(weights)
    loss_np = np.sum((-np.sum(soft * lp, -1) - entropy) * w)
    nll_np = np.sum(-np.sum(onehot * lp, -1) * w)
    hits_np = np.sum((np.argmax(np.asarray(logits), -1) == np.asarray(targets)) * w)
    got = ops.token_losses(logits, targets, weights, smoothing)
    np.testing.assert_allclose([float(x) for x in got], [loss_np, nll_np, hits_np, w.sum()], rtol=1e-5)
    grad = jax.grad(
        lambda x: (lambda s: s[0] + 0.3 * s[1])(ops.token_losses(x, targets, weights, smoothing))
    )(logits)
    p = np.exp(lp)
    want = w[..., None] * ((p - soft) + 0.3 * (p - onehot))
    np.testing.assert_allclose(grad, want, atol=1e-6)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_dropout_keep_rate_scale_and_independence(rate):
    x = jnp.full((64, 129, 33), 2.0, jnp.float32)  # odd last axis: the bit-halving pads and trims
    out = np.asarray(ops.dropout(x, rate, jax.random.key(0)))
    kept = out != 0
    n, keep = kept.size, 1.0 - rate
    # Binomial(n, keep): the kept share is within 5 standard deviations of 1 - rate.
    assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * rate / n)
    # Kept values are x / q for the realised q (1 - rate to 2^-16), so E[out] = x.
    q = round(keep * 65536) / 65536
    np.testing.assert_allclose(out[kept], 2.0 / q, rtol=1e-6)
    assert abs(q - keep) <= 2.0**-17
    # Neighbours along the last axis (two halves of one 32-bit draw) are uncorrelated.
    left, right = kept[..., :-1].ravel().astype(float), kept[..., 1:].ravel().astype(float)
    assert abs(np.corrcoef(left, right)[0, 1]) < 5 / np.sqrt(left.size)
    # Seeded: the same key gives the same mask, another key a different one.
    np.testing.assert_array_equal(out, ops.dropout(x, rate, jax.random.key(0)))
    assert (np.asarray(ops.dropout(x, rate, jax.random.key(1))) != out).any()


def test_dropout_edge_rates_and_gradient():
    x = jnp.arange(1.0, 7.0).reshape(2, 3)
    np.testing.assert_array_equal(ops.dropout(x, 0.0, jax.random.key(0)), x)
    np.testing.assert_array_equal(ops.dropout(x, 1.0, jax.random.key(0)), np.zeros((2, 3)))
    assert ops.dropout(jnp.asarray(3.0), 0.5, jax.random.key(0)).shape == ()
    assert ops.dropout(x.astype(jnp.bfloat16), 0.5, jax.random.key(0)).dtype == jnp.bfloat16
    # d out / d x is 1 / q (q = 0.5 exactly at rate 0.5) where the forward kept x, 0 where it dropped it.
    key = jax.random.key(5)
    grad = jax.grad(lambda v: ops.dropout(v, 0.5, key).sum())(x)
    kept = np.asarray(ops.dropout(x, 0.5, key)) != 0  # x has no zeros
    np.testing.assert_array_equal(grad, np.where(kept, 2.0, 0.0))


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_layer_norm_is_accurate_for_rows_far_from_zero(offset):
    # A one-pass E[x^2] - E[x]^2 loses ~offset^2 / var * 2^-24 to cancellation (0.3 at offset 1000);
    # the shifted one-pass form must stay as close to float64 as a two-pass float32 computation.
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 512)), np.float64) * 2 + offset
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    got = ops.layer_norm(jnp.asarray(x, jnp.float32), jnp.ones(512), jnp.zeros(512))
    np.testing.assert_allclose(got, want, atol=1e-4)
    g = jax.grad(lambda v: jnp.sum(ops.layer_norm(v, jnp.ones(512), jnp.zeros(512)) @ jnp.arange(512.0)))(
        jnp.asarray(x, jnp.float32)
    )
    # d/dx of sum(w * xhat) = (w - mean(w) - xhat * mean(w * xhat)) / sigma, in float64.
    w = np.arange(512.0)
    xhat, sigma = want, np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    grad_want = (w - w.mean() - xhat * (w * xhat).mean(-1, keepdims=True)) / sigma
    np.testing.assert_allclose(g, grad_want, atol=1e-2 * np.abs(grad_want).max())
