"""Fused attention kernels that take packing as segment ids: cuDNN flash attention (GPU) and
Pallas splash attention (TPU). Neither path builds a [B, *, T, S] mask or bias.

Shape letters as in `attention.py`; M is the static maximum of packed sequences per row.
Both kernels need segment ids 1..k (k <= M) with each sequence contiguous and 0 on padding, as
the packer writes them (`input_pipeline.make_dataset(max_segments=M)`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Float, Int

Array = jax.Array

# Mesh axes that shard the batch and the heads: the mesh side of sharding.DEFAULT_RULES (a test
# keeps them equal). Splash runs per shard under shard_map over exactly these.
BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXIS = "tensor"
LANES = 128  # splash blocks are multiples of the TPU lane width


def segment_layout(
    segment_ids: Int[Array, "B T"], max_segments: int
) -> tuple[Int[Array, "B M"], Int[Array, "B M1"]]:
    """Segment ids -> cuDNN's packed layout: (seqlens [B, M], offsets [B, M + 1]).

    Row b's sequence j (id j + 1) starts at offsets[b, j] and has seqlens[b, j] tokens; unused
    slots, and always the last offset column, are -1. O(B*T): a scatter per row, no [T, M] table.
    Ids above `max_segments` would be dropped, so the packer must cap sequences per row at M.
    """
    B, T = segment_ids.shape
    num = max_segments + 1  # slot 0 collects the padding

    def one_row(ids):
        length = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=num)[1:]
        start = jax.ops.segment_min(jnp.arange(T, dtype=ids.dtype), ids, num_segments=num)[1:]
        return length, start

    length, start = jax.vmap(one_row)(segment_ids.astype(jnp.int32))
    present = length > 0
    seqlens = jnp.where(present, length, -1)
    offsets = jnp.pad(jnp.where(present, start, -1), ((0, 0), (0, 1)), constant_values=-1)
    return seqlens, offsets


def zero_padding_queries(out: Float[Array, "B T N H"], segment_ids: Int[Array, "B T"] | None) -> Array:
    """0 at padding queries (segment id 0), the same on every attention path; `out` if no ids."""
    if segment_ids is None:
        return out
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(out.dtype)


def _repeat_kv(k: Array, v: Array, heads: int) -> tuple[Array, Array]:
    """[B, S, K, H] keys and values with each kv head repeated to `heads` heads."""
    return tuple(jnp.repeat(x, heads // x.shape[2], axis=2) for x in (k, v))


def _cudnn_module():
    """jax's cuDNN attention module (private API: packed rows are not public in jax <= 0.11)."""
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


def cudnn_supports_packing() -> bool:
    """Packed rows (several sequences per row) need a Hopper or newer GPU."""
    try:
        return bool(_cudnn_module().check_compute_capability("9.0"))
    except Exception:  # no GPU backend at all
        return False


def cudnn_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    is_causal: bool,
    segment_ids: Int[Array, "B T"] | None,
    kv_segment_ids: Int[Array, "B S"] | None,
    local_window: int | None,
    max_segments: int,
    scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """cuDNN flash attention; segment ids become per-sequence lengths and offsets.

    scale: on the logits (None: 1/sqrt(H)).
    max_segments == 1 (unpacked, padding at the end) uses jax's public API with per-row lengths
    (any cuDNN GPU); more uses the packed layout (Hopper). jax <= 0.11.0 scales the packed
    `kv_offsets` by the query head count, so K/V heads are repeated to N there (GQA/MQA).
    """
    N, H = q.shape[2], q.shape[3]
    scale = float(1.0 / np.sqrt(H)) if scale is None else float(scale)
    window = None if local_window is None else (local_window - 1, 0)
    if segment_ids is None:
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=is_causal, local_window_size=window, scale=scale, implementation="cudnn"
        )
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    if max_segments == 1:
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=is_causal,
            query_seq_lengths=jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32),
            key_value_seq_lengths=jnp.sum(kv_segment_ids != 0, axis=1, dtype=jnp.int32),
            local_window_size=window,
            scale=scale,
            implementation="cudnn",
        )
    else:
        cudnn = _cudnn_module()
        if k.shape[2] != N:
            k, v = _repeat_kv(k, v, N)
        q_len, q_off = segment_layout(segment_ids, max_segments)
        self_attention = kv_segment_ids is segment_ids
        kv_len, kv_off = (q_len, q_off) if self_attention else segment_layout(kv_segment_ids, max_segments)
        mask_type = cudnn.MaskType.PADDING_CAUSAL if is_causal else cudnn.MaskType.PADDING
        out = cudnn.dot_product_attention(
            q,
            k,
            v,
            q_seqlen=q_len,
            kv_seqlen=kv_len,
            q_offsets=q_off,
            kv_offsets=kv_off,
            scale=scale,
            mask_type=mask_type,
            sliding_window_length=local_window,
        )
    return zero_padding_queries(out, segment_ids).astype(q.dtype)


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length`."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


def _splash_kernel(T, S, N, mqa, is_causal, local_window, interpret):
    """A splash MHA (or MQA) kernel for one example: [N, T, H] queries against [K, S, H] keys."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if local_window is not None:
        right = 0 if is_causal else local_window - 1
        mask = splash.LocalMask((T, S), (local_window - 1, right), offset=0)
    elif is_causal:
        mask = splash.CausalMask((T, S))
    else:
        mask = splash.FullMask((T, S))
    bq, bkv = _block(T), _block(S)
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    make = splash.make_splash_mqa if mqa else splash.make_splash_mha
    return make(
        splash.MultiHeadMask([mask] * N),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _default_precision(fn):
    """`fn` with its forward *and* backward traced at the default matmul precision, whatever
    `jax_default_matmul_precision` says (a custom VJP: the backward is traced later, outside any
    context around the forward)."""
    precision = functools.partial(jax.default_matmul_precision, "default")

    @jax.custom_vjp
    def wrapped(*args):
        with precision():
            return fn(*args)

    def forward(*args):
        with precision():
            return jax.vjp(fn, *args)

    def backward(pullback, cotangent):
        with precision():
            return pullback(cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped


def splash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    is_causal: bool,
    segment_ids: Int[Array, "B T"] | None,
    kv_segment_ids: Int[Array, "B S"] | None,
    local_window: int | None,
    interpret: bool = False,
    scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """Pallas splash attention (TPU), vmapped over the batch and run per shard under a mesh.

    scale: on the logits (None: 1/sqrt(H)); splash has no scale argument, so q is scaled.
    T and S must be multiples of 128. `interpret=True` runs the same kernel on any backend (tests).
    Under a mesh (jax.set_mesh) the batch is split over BATCH_MESH_AXES and heads over
    HEAD_MESH_AXIS with shard_map; K/V heads that do not split are repeated to N first.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q.shape
    S = k.shape[1]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    if T % LANES or S % LANES:
        raise ValueError(
            f"splash attention needs lengths that are multiples of {LANES}; got T={T}, S={S}: pad the "
            f"rows (max_length) to a multiple of {LANES} or use implementation='xla'."
        )
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    mesh = jax.sharding.get_abstract_mesh()
    heads = mesh.shape.get(HEAD_MESH_AXIS, 1) if not mesh.empty else 1
    if k.shape[2] % heads:
        k, v = _repeat_kv(k, v, N)

    def per_shard(q, k, v, *segments):
        n_local, mqa = q.shape[2], k.shape[2] == 1
        kernel = _splash_kernel(T, S, n_local, mqa, is_causal, local_window, interpret)
        q = q * jnp.asarray(scale, q.dtype)
        qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, L, heads, H] -> [B, heads, L, H]
        if mqa:
            kh, vh = kh[:, 0], vh[:, 0]
        if segments:
            call = lambda a, b, c, sq, skv: kernel(a, b, c, segment_ids=splash.SegmentIds(sq, skv))  # noqa: E731
            out = jax.vmap(call)(qh, kh, vh, *segments)
        else:
            out = jax.vmap(kernel)(qh, kh, vh)
        return jnp.swapaxes(out, 1, 2)

    segments = () if segment_ids is None else (segment_ids, kv_segment_ids)
    if q.dtype in (jnp.bfloat16, jnp.float16):  # Mosaic rejects 16-bit dots asked for fp32 precision
        per_shard = _default_precision(per_shard)  # ("Bad lhs type"); 16-bit products are exact anyway
    if mesh.empty:
        out = per_shard(q, k, v, *segments)
    else:
        batch = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names) or None
        head = HEAD_MESH_AXIS if HEAD_MESH_AXIS in mesh.axis_names else None
        qkv, seg = P(batch, None, head, None), P(batch, None)
        out = jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(qkv, qkv, qkv) + (seg,) * len(segments),
            out_specs=qkv,
            check_vma=False,
        )(q, k, v, *segments)
    return zero_padding_queries(out, segment_ids).astype(q.dtype)
