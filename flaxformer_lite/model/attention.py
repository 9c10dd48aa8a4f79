"""The attention layer: self- and cross-attention with GQA, positions, the KV cache, Transformer-XL
memory (model/memory.py) and context parallelism (ops/context_parallel.py), over `ops` attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.model import memory
from flaxformer_lite.model.layers import dense
from flaxformer_lite.ops import context_parallel
from flaxformer_lite.sharding import BUCKETS, EMBED, HEADS, KV, KV_HEADS

Array = jax.Array


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with GQA/MQA, RoPE or relative/ALiBi bias, and a KV cache.

    With `config.decode`, self-attention keeps keys and values of past tokens in the "cache"
    collection (first call with a full-length input creates it empty), and cross-attention
    projects the encoder output once, when the cache is created, and reuses it.
    """

    config: ModelConfig
    causal: bool = False
    cross: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        *,
        segment_ids: Array | None = None,
        context_segment_ids: Array | None = None,
        positions: Array | None = None,
        relative_table: Array | None = None,
    ) -> Array:
        """x [B, T, d_model] (context [B, S, d_model] if cross) -> [B, T, d_model].

        relative_table: the stack's shared [buckets, N] relative-bias table (shared_relative_bias).
        """
        cfg = self.config
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = dense(cfg, (N, H), (EMBED, HEADS, KV), "query")(x)  # [B, T, N, H]
        # A key bias adds q.b to every logit of a query alike, which softmax ignores, so its gradient
        # is exactly 0 (unless RoPE rotates it per position); it exists only for checkpoints (GPT-2).
        constant = cfg.position != "rope"
        key = dense(cfg, (K, H), (EMBED, KV_HEADS, KV), "key", constant_bias=constant)
        value = dense(cfg, (K, H), (EMBED, KV_HEADS, KV), "value")
        mask = bias = None
        if self.cross:
            k, v, kv_segment_ids, cached = self._cross_kv(key, value, context, context_segment_ids)
            q_segment_ids = None
            if kv_segment_ids is not None:
                q_segment_ids = segment_ids
                if q_segment_ids is None:  # unpacked: every query belongs to sequence 1
                    q_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
            # Beam search keeps one cross cache row per source: its beams' queries join that row
            # as extra query steps (the encoder output is neither copied nor projected per beam).
            rows, q_shape = k.shape[0], q.shape
            q = q.reshape(rows, -1, N, H)
            if q_segment_ids is not None:
                q_segment_ids = q_segment_ids.reshape(rows, -1)
            if cached:  # decoding: keys and values from the head-major cache
                mask = ops.segment_mask(q_segment_ids, kv_segment_ids)
                out, probs = ops.cached_attention(q, k, v, mask=mask, scale=self._scale, weights=True)
                self._sow_weights(probs, q_shape)
                out = out.reshape(q_shape)
                return dense(cfg, cfg.d_model, (HEADS, KV, EMBED), "out", in_axes=2)(out)
        else:
            k, v = key(x), value(x)  # [B, T, K, H]
            q_segment_ids = kv_segment_ids = segment_ids
            caching = cfg.decode and self.causal  # encoders run whole even when decoding
            if caching and self.has_variable("cache", "cached_key"):
                q, k, v, mask, q_pos, kv_pos = self._decode_step(q, k, v, segment_ids)
                bias = self._position_bias(q_pos, kv_pos, relative_table)
                out = ops.cached_attention(q, k, v, mask=mask, bias=bias, scale=self._scale)
                return dense(cfg, cfg.d_model, (HEADS, KV, EMBED), "out", in_axes=2)(out)
            if caching:  # creating the cache: shapes only, output is not used
                self._decode_step(q, k, v, segment_ids)
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            q_pos = kv_pos = positions
            if cfg.position == "rope":
                q = ops.apply_rope(q, q_pos, cfg.rope_theta)
                k = ops.apply_rope(k, kv_pos, cfg.rope_theta)
            if cfg.memory_length and self.causal and not cfg.decode:  # Transformer-XL (model/memory.py)
                out = memory.attend(self, q, k, v, segment_ids, positions, relative_table)
                return dense(cfg, cfg.d_model, (HEADS, KV, EMBED), "out", in_axes=2)(out)
            bias = self._position_bias(q_pos, kv_pos, relative_table)
            if sequence_shards() > 1 and not caching:  # the mesh splits the sequence: context parallel
                out = _context_parallel(cfg, q, k, v, bias, segment_ids, positions, self.causal, self._scale)
                return dense(cfg, cfg.d_model, (HEADS, KV, EMBED), "out", in_axes=2)(out)
        dropout_rng = None
        if cfg.attention_dropout_rate > 0.0 and not cfg.deterministic:
            dropout_rng = self.make_rng("dropout")
        out = ops.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            is_causal=self.causal and mask is None,
            segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            local_window=None if (self.cross or mask is not None) else cfg.local_window,
            pattern=None if (self.cross or mask is not None) else cfg.pattern,
            max_segments=cfg.max_segments,
            dropout_rate=cfg.attention_dropout_rate,
            dropout_rng=dropout_rng,
            implementation=cfg.attention_impl,
            scale=self._scale,
        ).reshape(x.shape[:2] + (N, H))  # [B, T, N, H]
        return dense(cfg, cfg.d_model, (HEADS, KV, EMBED), "out", in_axes=2)(out)

    def _sow_weights(self, probs: Array, q_shape) -> None:
        """Keep the cross-attention probabilities [B, T, N, S] in "intermediates" (only if a
        caller asks for that collection: decoders that print alignments or draw attention).

        probs are [rows, N, beams * T, S] with the beams of a source joined as query steps.
        """
        rows, N, _, S = probs.shape
        B, T = q_shape[:2]
        per_beam = probs.reshape(rows, N, B // rows, T, S).transpose(0, 2, 3, 1, 4)
        self.sow("intermediates", "cross_attention_weights", per_beam.reshape(B, T, N, S))

    @property
    def _scale(self) -> float | None:
        """The logit scale: None (1/sqrt(head_dim)) or 1.0 without it (T5 folds it into the init)."""
        return None if self.config.scale_attention else 1.0

    def _cross_kv(self, key, value, context, context_segment_ids):
        """(keys, values, segment ids, cached) of the encoder output.

        When decoding they are projected once, when the cache is created, and kept head-major
        (see `_decode_step`); that first call gets them in the plain layout (cached=False).
        """
        if not self.config.decode:
            return key(context), value(context), context_segment_ids, False
        creating = not self.has_variable("cache", "cached_key")
        if context_segment_ids is None and creating:
            context_segment_ids = jnp.ones(context.shape[:2], jnp.int32)
        if creating:
            k, v = key(context), value(context)
            self.variable("cache", "cached_key", lambda: jnp.transpose(k, (0, 2, 3, 1)))  # [B, K, H, S]
            self.variable("cache", "cached_value", lambda: jnp.transpose(v, (0, 2, 1, 3)))  # [B, K, S, H]
            self.variable("cache", "cached_segment_ids", lambda: context_segment_ids)
            return k, v, context_segment_ids, False
        k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
        return k, v, self.get_variable("cache", "cached_segment_ids"), True

    def _decode_step(self, q, k, v, segment_ids):
        """Write T new keys/values at the cache index; mask = written, valid and causal slots.

        The cache is created (empty, sized by the first call's length) when absent. It is kept
        head-major, keys [B, K, H, S] and values [B, K, S, H]: the layouts the two matmuls of
        `ops.cached_attention` read, so no step transposes the whole cache (3x faster per
        attention on CPU than [B, S, K, H]). Slot index serves as the position for RoPE and
        relative biases, which depend only on offsets, so a left-padded prompt (segment id 0 on
        its padding) decodes like an unpadded one.
        """
        cfg = self.config
        creating = not self.has_variable("cache", "cached_key")
        B, S, K, H = k.shape
        ck = self.variable("cache", "cached_key", jnp.zeros, (B, K, H, S), k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (B, K, S, H), v.dtype)
        cvalid = self.variable("cache", "cached_valid", jnp.zeros, (B, S), jnp.bool_)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if creating:
            return None
        T = q.shape[1]
        S = ck.value.shape[3]
        i = index.value
        q_pos = jnp.broadcast_to(i + jnp.arange(T), (B, T))
        kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
        if cfg.position == "rope":
            q = ops.apply_rope(q, q_pos, cfg.rope_theta)
            k = ops.apply_rope(k, q_pos, cfg.rope_theta)  # the new keys sit at the query slots
        valid = jnp.ones((B, T), jnp.bool_) if segment_ids is None else segment_ids != 0
        new_k = jnp.transpose(k, (0, 2, 3, 1)).astype(ck.value.dtype)  # [B, K, H, T]
        new_v = jnp.transpose(v, (0, 2, 1, 3)).astype(cv.value.dtype)  # [B, K, T, H]
        ck.value = jax.lax.dynamic_update_slice(ck.value, new_k, (0, 0, 0, i))
        cv.value = jax.lax.dynamic_update_slice(cv.value, new_v, (0, 0, i, 0))
        cvalid.value = jax.lax.dynamic_update_slice(cvalid.value, valid, (0, i))
        index.value = i + T
        mask = ops.combine_masks(
            cvalid.value[:, None, None, :],
            ops.causal_mask(q_pos, kv_pos),
            None if cfg.local_window is None else ops.sliding_window_mask(q_pos, kv_pos, cfg.local_window),
            ops.pattern_mask(cfg.pattern, q_pos, kv_pos, causal=True),  # slots are row positions
        )
        return q, ck.value, cv.value, mask, q_pos, kv_pos

    def _position_bias(self, q_pos, kv_pos, table=None):
        """[B, N, T, S] relative (T5 buckets; the stack's table or this layer's) or ALiBi bias."""
        cfg = self.config
        if cfg.position == "alibi":
            return ops.alibi_bias(q_pos, kv_pos, cfg.num_heads)
        if cfg.position != "relative":
            return None
        if table is None:
            table = relative_table(self, cfg)
        return ops.relative_position_bias(
            q_pos,
            kv_pos,
            table,
            bidirectional=not self.causal,
            max_distance=cfg.relative_max_distance,
        )


def sequence_shards() -> int:
    """The size of the current mesh's "context" axis (1 without a mesh or without that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(context_parallel.CONTEXT_AXIS, 1)


def _context_parallel(cfg: ModelConfig, q, k, v, bias, segment_ids, positions, causal, scale) -> Array:
    """Self-attention [B, T, N, H] with the sequence split over the mesh's context axis, masked by
    the tokens' original `positions` (a load-balanced batch carries them) and segment ids."""
    if cfg.pattern is not None:
        raise ValueError(
            f"context parallelism (mesh_context={sequence_shards()}) has no sparse attention pattern: "
            f"use attention_pattern='full' (not {cfg.attention_pattern!r}) or mesh_context=1."
        )
    if bias is not None or (cfg.attention_dropout_rate > 0 and not cfg.deterministic):
        raise ValueError(
            f"context parallelism (mesh_context={sequence_shards()}) has no logit bias or attention "
            f"dropout: use position=rope, learned or sinusoidal (not {cfg.position!r}) and "
            "attention_dropout_rate=0, or mesh_context=1."
        )
    return context_parallel.context_parallel_attention(
        q, k, v, mesh=jax.sharding.get_abstract_mesh(), strategy=cfg.context_strategy, is_causal=causal,
        positions=positions, segment_ids=segment_ids, local_window=cfg.local_window, scale=scale,
    )  # fmt: skip


# Slot axis of each self-attention cache leaf (negative: the same under nn.scan's layer axis).
_CACHE_SLOT_AXIS = {"cached_key": -1, "cached_value": -2, "cached_valid": -1}


def cache_path_names(path) -> list:
    """The names along a "cache" collection key path: modules (e.g. "layers" for a scanned
    stack, "cross_attention"), then the variable."""
    return [getattr(key, "key", None) for key in path]


def _self_attention_slot_axis(path, x) -> int | None:
    """The slot axis of a self-attention cache leaf; None for cross-attention and other leaves."""
    names = cache_path_names(path)
    axis = _CACHE_SLOT_AXIS.get(names[-1])
    return None if axis is None or "cross_attention" in names else axis % x.ndim


def self_attention_cache_slots(cache) -> int | None:
    """The slot count of the self-attention caches in a "cache" collection (None if none)."""
    for path, x in jax.tree_util.tree_leaves_with_path(cache):
        axis = _self_attention_slot_axis(path, x)
        if axis is not None:
            return x.shape[axis]
    return None


def resize_self_attention_cache(cache, slots: int):
    """The "cache" collection with every self-attention cache cut or zero-padded to `slots` slots.

    Attention reads the slot count from the cache's shape, so a decoding loop can run its early
    steps over a short cache (the slots written so far) and grow it later. Cross-attention
    caches (the encoder output) keep their length.
    """

    def resize(path, x):
        axis = _self_attention_slot_axis(path, x)
        if axis is None:
            return x
        if slots <= x.shape[axis]:
            return jax.lax.slice_in_dim(x, 0, slots, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, slots - x.shape[axis])
        return jnp.pad(x, pad)

    return jax.tree_util.tree_map_with_path(resize, cache)


def relative_table(module: nn.Module, cfg: ModelConfig) -> Array:
    """A [relative_buckets, num_heads] relative-position bias table, a param of `module`."""
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (BUCKETS, HEADS))
    return module.param("relative_bias", init, (cfg.relative_buckets, cfg.num_heads), cfg.param_dtype)
