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

from flaxformer_lite.ops import patterns

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


SPLASH_BLOCKS = (512, 256, LANES)  # splash block sizes to try, largest first


def _block(length: int, divides: int = 512) -> int:
    """The largest of SPLASH_BLOCKS that divides `length` and `divides` (bigbird's block)."""
    return next(b for b in SPLASH_BLOCKS if length % b == 0 and divides % b == 0)


@functools.cache
def _pattern_mask_type():
    """splash's computable-mask class for an `AttentionPattern` (made once; splash imports lazily)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    class PatternMask(masks._ComputableMask):
        """`patterns.pattern_rule` evaluated per block: on the host by splash's mask processing
        (numpy ids: which blocks are empty, full or partial) and inside the kernel (jax ids).

        BigBird's block map is looked up on the host only: its blocks are unions of splash blocks,
        so every block it rules out is skipped and inside a block only the diagonal/causal part varies.
        """

        def __init__(self, shape, pattern, causal):
            self.pattern, self.causal = pattern, causal
            block_map = None
            if pattern.kind == "bigbird":
                block_map = patterns.bigbird_block_map(pattern, patterns.num_blocks(pattern, *shape), causal)

            def mask_function(q_ids, kv_ids):
                on_host = isinstance(q_ids, np.ndarray)
                return patterns.pattern_rule(
                    pattern, q_ids, kv_ids, causal=causal, block_map=block_map if on_host else None
                )

            super().__init__(shape=shape, mask_function=mask_function)
            self._block_map = block_map

        def __getitem__(self, idx):
            """The [q, kv] slice; a block the pattern rules out whole is zeros, not evaluated."""
            if len(idx) == 2 and all(isinstance(x, slice) and x.step in (None, 1) for x in idx):
                rows, cols = (range(*x.indices(n)) for x, n in zip(idx, self.shape, strict=True))
                empty = patterns.block_is_empty(
                    self.pattern, rows, cols, causal=self.causal, block_map=self._block_map
                )
                if rows and cols and empty:
                    return np.zeros((len(rows), len(cols)), np.bool_)
            return super().__getitem__(idx)

        def __eq__(self, other):
            key = lambda m: (m.shape, m.pattern, m.causal)  # noqa: E731
            return isinstance(other, PatternMask) and key(self) == key(other)

        def __hash__(self):
            return hash((PatternMask, self.shape, self.pattern, self.causal))

    return PatternMask


def pattern_splash_mask(pattern: patterns.AttentionPattern, shape: tuple[int, int], causal: bool):
    """A splash computable mask ([T, S], evaluated per block, never a T x S array) for `pattern`."""
    return _pattern_mask_type()(tuple(shape), pattern, causal)


def splash_block(pattern: patterns.AttentionPattern | None, length: int) -> int:
    """The splash block for a length: the largest of 512, 256, 128 dividing it (and bigbird's block)."""
    return _block(length, pattern.block if pattern is not None and pattern.kind == "bigbird" else 512)


def _splash_mask(T, S, is_causal, local_window, pattern):
    """One head's splash mask [T, S]: a computable mask (or FullMask), never a dense array."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if pattern is not None:
        return pattern_splash_mask(pattern, (T, S), is_causal)
    if local_window is not None:
        right = 0 if is_causal else local_window - 1
        return splash.LocalMask((T, S), (local_window - 1, right), offset=0)
    return splash.CausalMask((T, S)) if is_causal else splash.FullMask((T, S))


def splash_block_counts(
    T: int, S: int, *, is_causal: bool, local_window: int | None = None, pattern=None
) -> tuple[int, int, int]:
    """(computed blocks, all blocks, block size) of one head's splash forward pass.

    From splash's own mask processing (`process_mask`, what the kernel's grid reads): a block of
    `block_mask` 0 is skipped. The backward passes (dq, dkv) visit the same blocks.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info

    bq, bkv = splash_block(pattern, T), splash_block(pattern, S)
    mask = masks.MultiHeadMask([_splash_mask(T, S, is_causal, local_window, pattern)])
    mask_info, _ = info.process_mask(mask, (bq, bkv), shrink_grid=False)
    return int(np.count_nonzero(mask_info.block_mask)), (T // bq) * (S // bkv), bq


def _splash_kernel(T, S, N, mqa, is_causal, local_window, interpret, pattern=None):
    """A splash MHA (or MQA) kernel for one example: [N, T, H] queries against [K, S, H] keys."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = _splash_mask(T, S, is_causal, local_window, pattern)
    bq, bkv = splash_block(pattern, T), splash_block(pattern, S)
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
    pattern: patterns.AttentionPattern | None = None,
) -> Float[Array, "B T N H"]:
    """Pallas splash attention (TPU), vmapped over the batch and run per shard under a mesh.

    scale: on the logits (None: 1/sqrt(H)); splash has no scale argument, so q is scaled.
    pattern: a sparse pattern (`ops.patterns`) as a computable mask; its empty blocks are skipped.
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
        kernel = _splash_kernel(T, S, n_local, mqa, is_causal, local_window, interpret, pattern)
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
