"""Transformer-XL segment recurrence (Dai et al. 2019) on the KV-cache machinery.

With `ModelConfig.memory_length` M > 0, each causal self-attention layer keeps, in the "memory"
collection, the keys and values (head-major, as the KV cache: keys [B, K, H, M], values
[B, K, M, H]) of the last M positions it has seen, with their document ids and positions [B, M].
A segment's queries attend to those M slots plus their own causal prefix (`ops.cached_attention`),
so query i of a segment starting at stream position s0 sees keys j with s0 - M <= j <= i of its
own document: what one pass over the whole stream with that banded mask computes, layer by layer
(tests/test_memory.py). The memory is read and written under `lax.stop_gradient`: no gradient
reaches the previous segment. A sparse `attention_pattern` (local, longformer, chunked; not bigbird,
whose block map needs bounded positions) applies to memory and segment alike, by document position.

Keys are stored after RoPE (rotated at their document positions) and relative/ALiBi biases are
computed from stored positions, so only offsets matter. Document ids must be distinct across the
segments of a row (a running count, as `data/streams.py` makes; 0 = padding): a query never sees
memory of another document, which is how memory resets at a document boundary.

Call the model with the collection mutable to carry it:
`logits, v = model.apply({"params": p, "memory": mem}, ..., mutable=["memory"])`; `v["memory"]` is
the next segment's memory. Without a "memory" collection the memory is empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_lite import ops
from flaxformer_lite.sharding import BATCH, KV, KV_HEADS

Array = jax.Array

MEMORY = "memory"  # the variable collection


def _slots(module: nn.Module, B: int, K: int, H: int, dtype) -> tuple[dict | None, dict]:
    """(variables or None, values) of this layer's memory: empty (document id 0) when absent."""
    M = module.config.memory_length
    specs = {  # name: (shape, dtype, logical axes; the slot axis is not sharded)
        "keys": ((B, K, H, M), dtype, (BATCH, KV_HEADS, KV, None)),
        "values": ((B, K, M, H), dtype, (BATCH, KV_HEADS, None, KV)),
        "doc_ids": ((B, M), jnp.int32, (BATCH, None)),
        "positions": ((B, M), jnp.int32, (BATCH, None)),
    }
    if not (module.has_variable(MEMORY, "keys") or module.is_mutable_collection(MEMORY)):
        return None, {name: jnp.zeros(shape, dt) for name, (shape, dt, _) in specs.items()}
    variables = {
        name: module.variable(MEMORY, name, nn.with_logical_partitioning(jnp.zeros, axes), shape, dt)
        for name, (shape, dt, axes) in specs.items()
    }
    return variables, {name: jax.lax.stop_gradient(v.value) for name, v in variables.items()}


def attend(module: nn.Module, q: Array, k: Array, v: Array, doc_ids: Array, positions: Array, table=None):
    """This segment's attention with memory: q [B, T, N, H], k, v [B, T, K, H] (RoPE applied),
    doc_ids and positions [B, T] -> [B, T, N, H]; writes the new memory when it is mutable.

    `module` is the `MultiHeadAttention` (its position bias, logit scale and variables).
    """
    cfg = module.config
    B, T, K, H = k.shape
    variables, mem = _slots(module, B, K, H, k.dtype)
    keys = jnp.concatenate([mem["keys"], jnp.transpose(k, (0, 2, 3, 1))], 3)  # [B, K, H, M+T]
    values = jnp.concatenate([mem["values"], jnp.transpose(v, (0, 2, 1, 3))], 2)  # [B, K, M+T, H]
    kv_doc = jnp.concatenate([mem["doc_ids"], doc_ids], 1)  # [B, M+T]
    kv_pos = jnp.concatenate([mem["positions"], positions], 1)  # [B, M+T]
    window = None
    if cfg.local_window is not None:
        window = ops.sliding_window_mask(positions, kv_pos, cfg.local_window)
    # Same document, not later: memory slots precede the segment, and positions grow within a document.
    # A sparse pattern reads document positions: longformer's globals are each document's first tokens.
    causal = ops.pattern_mask(cfg.pattern, positions, kv_pos, causal=True)
    mask = ops.combine_masks(ops.segment_mask(doc_ids, kv_doc), causal, window)
    bias = module._position_bias(positions, kv_pos, table)
    out = ops.cached_attention(q, keys, values, mask=mask, bias=bias, scale=module._scale)
    if variables is not None and module.is_mutable_collection(MEMORY):
        new = {"keys": keys[..., T:], "values": values[:, :, T:], "doc_ids": kv_doc[:, T:],
               "positions": kv_pos[:, T:]}  # fmt: skip
        for name, var in variables.items():  # the last M slots of memory + segment
            var.value = jax.lax.stop_gradient(new[name])
    return out


def empty_memory(memory):
    """A memory tree (as `model.apply(..., mutable=["memory"])` returns it) with every slot empty."""
    return jax.tree.map(jnp.zeros_like, memory)
