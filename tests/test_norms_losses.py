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
