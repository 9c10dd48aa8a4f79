"""Context parallelism: attention over a sequence split into shards on the `context` mesh axis.

Shape letters as in `attention.py` (B, T, N, K, H; G = N // K query heads per kv head). Inside
`jax.shard_map` T and S are one shard's lengths and C is the size of the context axis.

Masks are built from each token's ORIGINAL position and its segment id, never from its index in
the shard, so a load-balanced (reordered) sequence attends exactly as the unsharded one, and packed
documents never attend across their boundaries. Both strategies are blockwise with an online
(log-sum-exp) softmax in fp32 and a custom backward that recomputes the probabilities from the
saved log-sum-exp (flash attention in plain XLA: nothing of size T x S is stored, the largest
temporary is one [chunk x chunk] block of logits per head, and a block the mask wholly hides, as
about half are under a causal mask, is skipped by `lax.cond` at run time):

- all_gather: keys, values (and their positions and segment ids) are gathered from every shard,
  queries stay local; the keys' and values' gradients are reduce-scattered back (the transpose of
  the gather).
- ring: key/value blocks travel around the axis with `lax.ppermute` (C - 1 hops); the backward
  sends them round again with their gradient accumulators (C hops home). No device holds more
  than its own block and the one passing through.

Every backend runs the XLA (einsum) blocks; TPU splash and cuDNN are not used under context
parallelism yet (splash with query-shard offsets would serve the all-gather strategy on TPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jaxtyping import Float, Int

from flaxformer_lite.ops import fused

Array = jax.Array

CONTEXT_AXIS = "context"  # the mesh axis that splits the sequence
STRATEGIES = ("all_gather", "ring")
_NEG = -0.7 * float(np.finfo(np.float32).max)  # a masked logit: finite, so exp(_NEG - m) is 0, never NaN


# ------------------------------------------------------------------------------ load balancing


def load_balance_order(T: int, context: int) -> np.ndarray:
    """[T] indices of the dual-chunk-swap order: reordered token j is original token order[j].

    The sequence is cut into 2C equal chunks; shard i (the i-th of C equal slices of the reordered
    sequence) holds chunks i and 2C-1-i, an early and a late one, so under a causal mask every
    shard has the same work (without it the last shard does 2C-1 times the first one's).
    """
    if context < 1 or T % (2 * context):
        raise ValueError(
            f"load balancing over context={context} needs a length divisible by {2 * context}, not {T}; "
            f"use a max_length that is a multiple of {2 * context}."
        )
    c = T // (2 * context)
    chunks = [j for i in range(context) for j in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks])


def inverse_order(order: np.ndarray) -> np.ndarray:
    """The permutation that undoes `order`: reorder(reorder(x, order), inverse_order(order)) == x."""
    return np.argsort(order)


def reorder(x: Float[Array, "B T ..."], order: np.ndarray) -> Array:
    """[B, T, ...] -> [B, T, ...] with the tokens in `order` (a gather along the sequence axis)."""
    return jnp.take(x, jnp.asarray(order, jnp.int32), axis=1)


def causal_work(positions: np.ndarray, segment_ids: np.ndarray, context: int) -> np.ndarray:
    """[C] counts of (query, key) pairs a causal, segment-masked attention computes per shard when
    [T] `positions` and `segment_ids` (of one row, in the order they are sharded) split C ways."""
    q_pos, q_seg = (np.asarray(x).reshape(context, -1) for x in (positions, segment_ids))
    pos, seg = np.asarray(positions), np.asarray(segment_ids)
    seen = (seg[None, None, :] == q_seg[:, :, None]) & (pos[None, None, :] <= q_pos[:, :, None])
    return seen.sum(axis=(1, 2))


# ------------------------------------------------------------------------------ blockwise attention


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What the blocks need besides arrays (static: hashable, a nondiff argument)."""

    causal: bool
    window: int | None
    scale: float
    chunk: int


def _chunk(length: int, want: int) -> int:
    """The block length along a sequence of `length`: `want` if it divides, else their gcd."""
    return want if length % want == 0 else int(np.gcd(length, want))


def _split(x: Array, c: int) -> Array:
    """[B, L, ...] -> [L/c, B, c, ...]: chunks of the sequence axis first (for scan and map)."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // c, c, *x.shape[2:]), 1, 0)


def _join(x: Array) -> Array:
    """[L/c, B, c, ...] -> [B, L, ...], the inverse of `_split`."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def _mask(q_ids, k_ids, spec: _Spec) -> Array:
    """[B, Tq], [B, S] (positions, segment ids) -> [B, Tq, S] bool: a query sees keys of its
    segment (at or before its position if causal, closer than `window` positions if windowed)."""
    (qp, qs), (kp, ks) = q_ids, k_ids
    mask = qs[:, :, None] == ks[:, None, :]
    if spec.causal:
        mask &= kp[:, None, :] <= qp[:, :, None]
    if spec.window is not None:
        mask &= jnp.abs(qp[:, :, None] - kp[:, None, :]) < spec.window
    return mask


def _logits(q, k, mask, spec: _Spec) -> Array:
    """q [B, Tq, K, G, H], k [B, S, K, H], mask [B, Tq, S] -> fp32 logits [B, Tq, K, G, S], masked to _NEG."""
    s = jnp.einsum("btkgh,bskh->btkgs", q, k, preferred_element_type=jnp.float32) * spec.scale
    return jnp.where(mask[:, :, None, None, :], s, _NEG)


def _unless_masked(mask: Array, fn, carry):
    """fn(carry), or carry unchanged where the [B, Tq, S] block is wholly masked (a causal mask
    hides about half the blocks): `lax.cond` skips the block's matmuls at run time."""
    return lax.cond(jnp.any(mask), fn, lambda c: c, carry)


def _init_state(q: Array) -> tuple[Array, Array, Array]:
    """The online-softmax state of no keys seen: (acc [B, T, K, G, H], max, sum [B, T, K, G]), fp32."""
    stats = q.shape[:-1]
    return jnp.zeros(q.shape, jnp.float32), jnp.full(stats, _NEG, jnp.float32), jnp.zeros(stats, jnp.float32)


def _attend_block(state, q, k, v, q_ids, k_ids, spec: _Spec):
    """The online-softmax state of queries q after one more block of keys k and values v [B, S, K, H].

    Queries in chunks (lax.map), keys in chunks (lax.scan): one [chunk, chunk] logit block per head
    at a time. A query whose keys so far are all masked holds garbage that the first real key's
    correction factor exp(_NEG - m) = 0 wipes out (every query sees at least itself).
    """
    cq, ck = _chunk(q.shape[1], spec.chunk), _chunk(k.shape[1], spec.chunk)
    keys = (_split(k, ck), _split(v, ck), _split(k_ids[0], ck), _split(k_ids[1], ck))

    def per_query_chunk(args):
        st, qc, qp, qs = args

        def step(st, kv):
            kc, vc, kp, ks = kv
            mask = _mask((qp, qs), (kp, ks), spec)

            def update(st):
                acc, m, total = st
                s = _logits(qc, kc, mask, spec)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                fix = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "btkgs,bskh->btkgh", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32
                )
                return acc * fix[..., None] + pv, m_new, total * fix + p.sum(-1)

            return _unless_masked(mask, update, st), None

        return lax.scan(step, st, keys)[0]

    chunks = (tuple(_split(x, cq) for x in state), _split(q, cq), _split(q_ids[0], cq), _split(q_ids[1], cq))
    return tuple(_join(x) for x in lax.map(per_query_chunk, chunks))


def _finish(state, dtype):
    """(output [B, T, K, G, H] in `dtype`, log-sum-exp [B, T, K, G] fp32) of a final state."""
    acc, m, total = state
    return (acc / total[..., None]).astype(dtype), m + jnp.log(total)


def _grad_q(q, k, v, do, lse, delta, q_ids, k_ids, spec: _Spec) -> Array:
    """dL/dq [B, T, K, G, H] (fp32) from one key/value block, recomputing its probabilities."""
    cq, ck = _chunk(q.shape[1], spec.chunk), _chunk(k.shape[1], spec.chunk)
    keys = (_split(k, ck), _split(v, ck), _split(k_ids[0], ck), _split(k_ids[1], ck))

    def per_query_chunk(args):
        qc, doc, lc, dc, qp, qs = args

        def step(dq, kv):
            kc, vc, kp, ks = kv
            mask = _mask((qp, qs), (kp, ks), spec)

            def update(dq):
                p = jnp.exp(_logits(qc, kc, mask, spec) - lc[..., None])
                dp = jnp.einsum("btkgh,bskh->btkgs", doc, vc, preferred_element_type=jnp.float32)
                ds = p * (dp - dc[..., None]) * spec.scale
                return dq + jnp.einsum("btkgs,bskh->btkgh", ds, kc, preferred_element_type=jnp.float32)

            return _unless_masked(mask, update, dq), None

        return lax.scan(step, jnp.zeros(qc.shape, jnp.float32), keys)[0]

    queries = tuple(_split(x, cq) for x in (q, do, lse, delta, *q_ids))
    return _join(lax.map(per_query_chunk, queries))


def _grad_kv(q, k, v, do, lse, delta, q_ids, k_ids, spec: _Spec) -> tuple[Array, Array]:
    """(dL/dk, dL/dv) [B, S, K, H] (fp32) of one key/value block, recomputing its probabilities."""
    cq, ck = _chunk(q.shape[1], spec.chunk), _chunk(k.shape[1], spec.chunk)
    queries = tuple(_split(x, cq) for x in (q, do, lse, delta, *q_ids))

    def per_key_chunk(args):
        kc, vc, kp, ks = args

        def step(grads, qa):
            qc, doc, lc, dc, qp, qs = qa
            mask = _mask((qp, qs), (kp, ks), spec)

            def update(grads):
                p = jnp.exp(_logits(qc, kc, mask, spec) - lc[..., None])
                dv = jnp.einsum("btkgs,btkgh->bskh", p, doc, preferred_element_type=jnp.float32)
                dp = jnp.einsum("btkgh,bskh->btkgs", doc, vc, preferred_element_type=jnp.float32)
                ds = p * (dp - dc[..., None]) * spec.scale
                dk = jnp.einsum("btkgs,btkgh->bskh", ds, qc, preferred_element_type=jnp.float32)
                return grads[0] + dk, grads[1] + dv

            return _unless_masked(mask, update, grads), None

        zeros = jnp.zeros(kc.shape, jnp.float32)
        return lax.scan(step, (zeros, zeros), queries)[0]

    keys = (_split(k, ck), _split(v, ck), _split(k_ids[0], ck), _split(k_ids[1], ck))
    dk, dv = lax.map(per_key_chunk, keys)
    return _join(dk), _join(dv)


def _delta(do: Array, o: Array) -> Array:
    """rowsum(dO * O) [B, T, K, G] (fp32): the softmax backward's per-query term."""
    return jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)


# ------------------------------------------------------------------------------ one device's keys


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qp, qs, kp, ks, spec: _Spec):
    """Blockwise attention of q [B, T, K, G, H] to all of k, v [B, S, K, H] (ids by position)."""
    return _flash_fwd(q, k, v, qp, qs, kp, ks, spec)[0]


def _flash_fwd(q, k, v, qp, qs, kp, ks, spec):
    state = _attend_block(_init_state(q), q, k, v, (qp, qs), (kp, ks), spec)
    o, lse = _finish(state, q.dtype)
    return o, (q, k, v, qp, qs, kp, ks, o, lse)


def _flash_bwd(spec, res, do):
    q, k, v, qp, qs, kp, ks, o, lse = res
    delta = _delta(do, o)
    args = (q, k, v, do, lse, delta, (qp, qs), (kp, ks), spec)
    dq, (dk, dv) = _grad_q(*args), _grad_kv(*args)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------ the ring


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ring(q, k, v, qp, qs, kp, ks, spec: _Spec, axis_name: str):
    """Attention of the local queries to every shard's keys, passed around the ring."""
    return _ring_fwd(q, k, v, qp, qs, kp, ks, spec, axis_name)[0]


def _pass_on(xs: tuple, axis_name: str) -> tuple:
    """Each array to the next device on the axis (device i -> i + 1, the last to the first)."""
    size = lax.axis_size(axis_name)
    perm = [(i, (i + 1) % size) for i in range(size)]
    return tuple(lax.ppermute(x, axis_name, perm) for x in xs)


def _ring_fwd(q, k, v, qp, qs, kp, ks, spec, axis_name):
    state = _attend_block(_init_state(q), q, k, v, (qp, qs), (kp, ks), spec)

    def hop(carry, _):  # after hop h, device i holds the block of device i - h
        state, block = carry
        block = _pass_on(block, axis_name)
        kb, vb, kpb, ksb = block
        return (_attend_block(state, q, kb, vb, (qp, qs), (kpb, ksb), spec), block), None

    hops = lax.axis_size(axis_name) - 1
    (state, _), _ = lax.scan(hop, (state, (k, v, kp, ks)), None, length=hops)
    o, lse = _finish(state, q.dtype)
    return o, (q, k, v, qp, qs, kp, ks, o, lse)


def _ring_bwd(spec, axis_name, res, do):
    q, k, v, qp, qs, kp, ks, o, lse = res
    delta = _delta(do, o)

    def visit(dq, block, dk, dv):  # gradients from the block held now; dk, dv travel with it
        kb, vb, kpb, ksb = block
        args = (q, kb, vb, do, lse, delta, (qp, qs), (kpb, ksb), spec)
        dkb, dvb = _grad_kv(*args)
        return dq + _grad_q(*args), dk + dkb, dv + dvb

    def hop(carry, _):
        dq, block, dk, dv = carry
        dq, dk, dv = visit(dq, block, dk, dv)
        block, (dk, dv) = _pass_on(block, axis_name), _pass_on((dk, dv), axis_name)
        return (dq, block, dk, dv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    carry = (jnp.zeros(q.shape, jnp.float32), (k, v, kp, ks), zeros, zeros)
    (dq, block, dk, dv), _ = lax.scan(hop, carry, None, length=lax.axis_size(axis_name) - 1)
    dq, dk, dv = visit(dq, block, dk, dv)
    dk, dv = _pass_on((dk, dv), axis_name)  # the last hop home: C hops in all
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ------------------------------------------------------------------------------ per-shard entry points


def _grouped(fn, q, k, v, q_ids, k_ids, spec, *extra):
    """`fn` on queries grouped by their kv head: [B, T, N, H] -> [B, T, K, G, H] and back."""
    B, T, N, H = q.shape
    K = k.shape[2]
    # The ids tied to q: otherwise partial evaluation (remat, a scan over layers) finds the masks
    # depend only on ids, "known" values, computes every block's mask ahead and keeps them all (T x S).
    q, q_ids, k_ids = lax.optimization_barrier((q, q_ids, k_ids))
    out = fn(q.reshape(B, T, K, N // K, H), k, v, *q_ids, *k_ids, spec, *extra)
    return out.reshape(B, T, N, H)


def _spec(q, is_causal, local_window, scale, chunk) -> _Spec:
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else float(scale)
    return _Spec(bool(is_causal), local_window, scale, int(chunk))


def all_gather_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    positions: Int[Array, "B T"],
    segment_ids: Int[Array, "B T"],
    *,
    axis_name: str = CONTEXT_AXIS,
    is_causal: bool,
    local_window: int | None = None,
    scale: float | None = None,
    chunk: int = 512,
) -> Float[Array, "B T N H"]:
    """One shard's attention output [B, T, N, H], inside `jax.shard_map` over `axis_name`.

    q, k, v, positions and segment ids are this shard's slice of the sequence; keys, values and
    their ids are all-gathered (each device then holds the whole K/V), queries stay local.
    Masking is by original position and segment id (segment 0 = padding: its queries see padding
    keys only; callers zero their outputs). scale: None is 1/sqrt(H). chunk: the block length.
    """
    gather = functools.partial(lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
    kg, vg, kp, ks = (gather(x) for x in (k, v, positions, segment_ids))
    spec = _spec(q, is_causal, local_window, scale, chunk)
    return _grouped(_flash, q, kg, vg, (positions, segment_ids), (kp, ks), spec)


def ring_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    positions: Int[Array, "B T"],
    segment_ids: Int[Array, "B T"],
    *,
    axis_name: str = CONTEXT_AXIS,
    is_causal: bool,
    local_window: int | None = None,
    scale: float | None = None,
    chunk: int = 512,
) -> Float[Array, "B T N H"]:
    """`all_gather_attention`'s result, with K/V blocks passed around the ring instead of gathered.

    C - 1 `ppermute` hops of (keys, values, positions, segment ids) forward, merged by online
    softmax in fp32; the backward passes them round again with their gradients (C hops home).
    """
    spec = _spec(q, is_causal, local_window, scale, chunk)
    return _grouped(_ring, q, k, v, (positions, segment_ids), (positions, segment_ids), spec, axis_name)


def context_parallel_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    *,
    mesh,
    strategy: str = "all_gather",
    is_causal: bool,
    positions: Int[Array, "B T"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    local_window: int | None = None,
    scale: float | None = None,
    chunk: int = 512,
) -> Float[Array, "B T N H"]:
    """Self-attention [B, T, N, H] over `mesh` with the sequence split on its "context" axis.

    The batch is split over data x fsdp, the sequence over context and the heads over tensor
    (kv heads that do not split are repeated first), under `jax.shard_map` running `strategy`
    ("all_gather" or "ring") per shard. positions [B, T] (None: 0..T-1) are the tokens' original
    positions (a load-balanced order carries them); segment ids [B, T] (None: one sequence) keep
    packed documents apart, and outputs at padding (id 0) are 0 as on every attention path.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"context strategy {strategy!r} is unknown; use one of {STRATEGIES}.")
    B, T, N, _ = q.shape
    context = mesh.shape.get(CONTEXT_AXIS, 1)
    if T % context:
        raise ValueError(f"length {T} does not split over context={context}; use a multiple of {context}.")
    ids = segment_ids if segment_ids is not None else jnp.ones((B, T), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions is None else positions
    heads = mesh.shape.get(fused.HEAD_MESH_AXIS, 1)
    if k.shape[2] % heads:
        k, v = (jnp.repeat(x, N // x.shape[2], axis=2) for x in (k, v))
    batch = tuple(a for a in fused.BATCH_MESH_AXES if a in mesh.axis_names) or None
    head = fused.HEAD_MESH_AXIS if fused.HEAD_MESH_AXIS in mesh.axis_names else None
    qkv, row = P(batch, CONTEXT_AXIS, head, None), P(batch, CONTEXT_AXIS)
    per_shard = ring_attention if strategy == "ring" else all_gather_attention
    fn = functools.partial(
        per_shard, is_causal=is_causal, local_window=local_window, scale=scale, chunk=chunk
    )
    out = jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, row, row), out_specs=qkv, check_vma=False)(
        q, k, v, positions.astype(jnp.int32), ids.astype(jnp.int32)
    )
    return fused.zero_padding_queries(out, segment_ids).astype(q.dtype)
