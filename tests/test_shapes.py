"""The jaxtyping shape annotations of the public ops, checked by beartype on real calls.

Distinct prime sizes (B=2, T=3, S=5, N=6 query heads over K=2 kv heads, H=7) so that an
annotation naming the wrong axis, or an op fed swapped axes, cannot pass.
"""

import jax
import jax.numpy as jnp
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from flaxformer_lite import ops

B, T, S, N, K, H, V = 2, 3, 5, 6, 2, 7, 11


def checked(fn):
    return jaxtyped(typechecker=beartype)(fn)


def test_attention_annotations_accept_gqa_cross_attention_and_reject_swapped_axes():
    q, kv = jnp.ones((B, T, N, H)), jnp.ones((B, S, K, H))
    seg_q, seg_kv = jnp.ones((B, T), jnp.int32), jnp.ones((B, S), jnp.int32)
    attention = checked(ops.dot_product_attention)
    out = attention(q, kv, kv, segment_ids=seg_q, kv_segment_ids=seg_kv)
    assert out.shape == (B, T, N, H)
    assert checked(ops.reference_attention)(q, kv, kv, mask=ops.segment_mask(seg_q, seg_kv)).shape == q.shape
    with pytest.raises(TypeCheckError):  # keys with another head dim
        attention(q, jnp.ones((B, S, K, H + 1)), jnp.ones((B, S, K, H + 1)))
    with pytest.raises(TypeCheckError):  # key segment ids of the query length
        attention(q, kv, kv, segment_ids=seg_q, kv_segment_ids=seg_q)
    with pytest.raises(TypeCheckError):  # a mask [B, 1, S, T] (query and key axes swapped)
        checked(ops.reference_attention)(q, kv, kv, mask=jnp.ones((B, 1, S, T), bool))


def test_mask_position_norm_and_loss_annotations():
    pos_q, pos_kv = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    assert checked(ops.causal_mask)(pos_q, pos_kv).shape == (B, 1, T, S)
    assert checked(ops.sliding_window_mask)(pos_q, pos_kv, 2).shape == (B, 1, T, S)
    assert checked(ops.apply_rope)(jnp.ones((B, T, N, 8)), pos_q).shape == (B, T, N, 8)
    with pytest.raises(TypeCheckError):  # positions [B, S] for queries [B, T, ...]
        checked(ops.apply_rope)(jnp.ones((B, T, N, 8)), pos_kv)
    assert checked(ops.sinusoidal_embedding)(pos_q, 10).shape == (B, T, 10)
    x = jnp.ones((B, T, H))
    assert checked(ops.layer_norm)(x, jnp.ones(H), jnp.zeros(H)).shape == x.shape
    with pytest.raises(TypeCheckError):
        checked(ops.rms_norm)(x, jnp.ones(H + 1))
    assert checked(ops.dropout)(x, 0.5, jax.random.key(0)).shape == x.shape
    logits, targets = jnp.zeros((B, T, V)), jnp.zeros((B, T), jnp.int32)
    total, denom = checked(ops.cross_entropy)(logits, targets, jnp.ones((B, T)), 0.1)
    assert total.shape == denom.shape == ()
    with pytest.raises(TypeCheckError):  # targets of another length
        checked(ops.cross_entropy)(logits, jnp.zeros((B, S), jnp.int32))
    assert checked(ops.shift_right)(targets).shape == (B, T)
