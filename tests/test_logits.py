"""ops.tied_logits: the CPU gradient written by hand equals autodiff's of the plain projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import ops
from flaxformer_lite.ops import logits as logits_mod


@pytest.mark.parametrize("backends", [("cpu",), ()], ids=["custom_vjp", "autodiff"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_logits_value_and_gradients_match_numpy(monkeypatch, backends, dtype):
    """x E^T and d/dx, d/dE of sum(c * logits) against numpy, on both paths (distinct prime dims)."""
    monkeypatch.setattr(logits_mod, "TRANSPOSED_GRAD_BACKENDS", backends)
    B, T, D, V = 3, 5, 7, 11
    x = jax.random.normal(jax.random.key(0), (B, T, D)).astype(dtype)
    emb = jax.random.normal(jax.random.key(1), (V, D)).astype(dtype)
    c = jax.random.normal(jax.random.key(2), (B, T, V))
    f = lambda x, e: jnp.sum(c * ops.tied_logits(x, e).astype(jnp.float32))  # noqa: E731
    dx, de = jax.grad(f, argnums=(0, 1))(x, emb)
    assert dx.dtype == dtype and de.dtype == dtype and dx.shape == x.shape and de.shape == emb.shape
    xn, en, cn = (np.asarray(a, np.float64) for a in (x, emb, c))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=1e-1)
    np.testing.assert_allclose(np.asarray(ops.tied_logits(x, emb), np.float64), xn @ en.T, **tol)
    np.testing.assert_allclose(np.asarray(dx, np.float64), cn @ en, **tol)
    np.testing.assert_allclose(np.asarray(de, np.float64), np.einsum("btv,btd->vd", cn, xn), **tol)


def test_tied_logits_cpu_gradient_forms_the_logits_gradient_once():
    """On CPU the compiled LM head backward has no [V, tokens] copy of the logits gradient."""
    B, T, D, V = 2, 32, 24, 97  # autodiff's gradient holds an f32[97,64] copy here (checked)
    targets = jnp.zeros((B, T), jnp.int32)

    def loss(x, e):
        return ops.token_losses(ops.tied_logits(x, e), targets)[0]

    x, e = jnp.ones((B, T, D)), jnp.ones((V, D))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, e).compile().as_text()
    assert f"f32[{V},{B * T}]" not in text, "the logits gradient was copied into [V, tokens] order"
