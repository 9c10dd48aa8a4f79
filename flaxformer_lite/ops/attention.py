"""Scaled dot-product attention and the boolean masks that feed it (pure JAX).

Shape letters used throughout: B batch, T query length, S key/value length, N query heads,
K key/value heads (N % K == 0: K == N is multi-head, 1 < K < N grouped-query, K == 1 multi-query),
H head dim. Masks are boolean with True meaning "may attend", shaped [B, 1 or N, T, S].
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Int

from flaxformer_lite.ops import fused
from flaxformer_lite.ops.dropout import dropout as _dropout
from flaxformer_lite.ops.patterns import AttentionPattern, pattern_mask

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests

# None chooses per backend; "splash_interpret" is splash in Pallas interpret mode (any backend, slow:
# for tests and debugging).
IMPLEMENTATIONS = (None, "xla", "cudnn", "splash", "splash_interpret", "reference")
_announced: set[str] = set()


def causal_mask(q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"]) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] positions -> [B, 1, T, S]: a query sees keys at its position or earlier."""
    return kv_positions[:, None, None, :] <= q_positions[:, None, :, None]


def padding_mask(q_valid: Bool[Array, "B T"], kv_valid: Bool[Array, "B S"]) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] booleans (True = real token) -> [B, 1, T, S]: real queries see real keys."""
    return q_valid[:, None, :, None] & kv_valid[:, None, None, :]


def segment_mask(
    q_segment_ids: Int[Array, "B T"], kv_segment_ids: Int[Array, "B S"]
) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] integer ids -> [B, 1, T, S]: tokens of packed sequences see only their own.

    Id 0 marks padding. A padding query sees padding keys only (its output is ignored downstream),
    so no row of the mask is ever empty and softmax never divides by zero.
    """
    return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def sliding_window_mask(
    q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"], window: int
) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] positions -> [B, 1, T, S]: keys fewer than `window` positions away.

    Combined with `causal_mask` this is the usual left-only local window (window 1 = self only).
    """
    distance = q_positions[:, None, :, None] - kv_positions[:, None, None, :]
    return jnp.abs(distance) < window


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the masks that are not None (None if all are None)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def _full_mask(q, k, mask, is_causal, segment_ids, kv_segment_ids, local_window, pattern=None):
    """Every constraint as one boolean [B, 1 or N, T, S] mask (None if unconstrained)."""
    B, T = q.shape[:2]
    S = k.shape[1]
    q_idx = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    kv_idx = jnp.broadcast_to(jnp.arange(S)[None], (B, S))
    seg = None
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        seg = segment_mask(segment_ids, kv_seg)
    return combine_masks(
        None if mask is None else jnp.broadcast_to(mask, (B,) + mask.shape[1:]),
        causal_mask(q_idx, kv_idx) if is_causal else None,
        seg,
        sliding_window_mask(q_idx, kv_idx, local_window) if local_window is not None else None,
        pattern_mask(pattern, q_idx, kv_idx, causal=is_causal),
    )


def reference_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Bool[Array, "#B #N T S"] | None = None,
    bias: Float[Array, "#B #N T S"] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """Plain-einsum attention, fp32 logits and softmax: [B,T,N,H], [B,S,K,H] x2 -> [B,T,N,H].

    mask: bool [B or 1, N or 1, T, S]; bias: float [B or 1, N or 1, T, S], added to the logits.
    scale: on q k^T (None: 1/sqrt(H)). The only path that applies dropout to the probabilities.
    """
    return _grouped_attention(
        q, k, v, "bskh", mask=mask, bias=bias, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        scale=scale,
    )  # fmt: skip


def _grouped_attention(
    q, k, v, kv_layout: str, *, mask, bias, dropout_rate=0.0, dropout_rng=None, scale=None, weights=False
):
    """The einsum attention of `reference_attention` and `cached_attention`.

    `kv_layout` names the key axes: "bskh" ([B, S, K, H] keys and values) or "bkhs" (head-major
    cache: keys [B, K, H, S], values [B, K, S, H]). Query heads are grouped by the kv head they
    share; fp32 logits and softmax. weights: also return the probabilities [B, N, T, S].
    """
    B, T, N, H = q.shape
    K = k.shape[kv_layout.index("k")]
    G = N // K
    v_layout = "bskh" if kv_layout == "bskh" else "bksh"
    qg = q.reshape(B, T, K, G, H)
    logits = jnp.einsum(f"btkgh,{kv_layout}->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / jnp.sqrt(jnp.float32(H)) if scale is None else jnp.float32(scale))
    if bias is not None:
        logits = logits + _group_heads(bias.astype(jnp.float32), K, G)
    if mask is not None:
        logits = jnp.where(_group_heads(mask, K, G), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        probs = _dropout(probs, dropout_rate, dropout_rng)
    out = jnp.einsum(f"bkgts,{v_layout}->btkgh", probs.astype(v.dtype), v).reshape(B, T, N, H)
    return (out, probs.reshape(B, N, T, -1)) if weights else out


def cached_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B K H S"],
    v: Float[Array, "B K S H"],
    *,
    mask: Bool[Array, "#B #N T S"] | None = None,
    bias: Float[Array, "#B #N T S"] | None = None,
    scale: float | None = None,
    weights: bool = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B N T S"]]:
    """Attention over a head-major KV cache (decoding): keys [B, K, H, S], values [B, K, S, H].

    Those are the layouts the two matmuls read, so a decoding step never transposes the cache
    (with [B, S, K, H] XLA copies every cached key and value once per step). fp32 logits and
    softmax, GQA/MQA by grouping query heads; mask/bias/scale as in `reference_attention`.
    weights: also return the attention probabilities [B, N, T, S] (fp32).
    """
    users = "KV-cache decoding or Transformer-XL memory"
    _announce(f"q{tuple(q.shape)} over a head-major cache of S={k.shape[3]} ({users}): XLA")
    return _grouped_attention(q, k, v, "bkhs", mask=mask, bias=bias, scale=scale, weights=weights)


def _group_heads(x: Array, K: int, G: int) -> Array:
    """[B, N or 1, T, S] -> [B, K or 1, G or 1, T, S] to line up with grouped query heads."""
    b, n, t, s = x.shape
    return x.reshape(b, K, G, t, s) if n == K * G else x.reshape(b, 1, 1, t, s)


def choose_implementation(
    backend: str,
    *,
    dtype,
    head_dim: int,
    q_len: int,
    kv_len: int,
    has_mask: bool = False,
    has_bias: bool = False,
    dropout: bool = False,
    packed: bool = False,
    packed_on_cudnn: bool = True,
    bidirectional_window: bool = False,
    pattern: AttentionPattern | None = None,
    requested: str | None = None,
) -> tuple[str, str]:
    """(implementation, reason): the fused kernel for `backend` ("gpu", "tpu", "cpu") when it can
    serve these inputs, else the XLA (or, for attention dropout, einsum) path and why.

    `requested` forces a path ("cudnn", "splash", ...); inputs it cannot serve still fall back.
    `packed`: rows hold several sequences, which cuDNN serves only where `packed_on_cudnn`
    (a Hopper or newer GPU). `bidirectional_window`: a local window without causality, which
    cuDNN's left-only windows cannot express. `pattern`: a sparse pattern other than local
    (longformer, bigbird, chunked), which only splash serves (bigbird blocks multiples of 128).
    """
    if requested in ("reference", "xla"):
        return requested, "attention_impl forces it"
    if dropout:
        return "reference", "attention dropout needs the einsum path"
    if has_mask:
        return "xla", "an explicit mask (KV-cache decoding) takes the XLA path"
    if has_bias:
        return "xla", "a logit bias (relative/ALiBi positions) has no fused kernel here"
    want = requested or {"gpu": "cudnn", "tpu": "splash"}.get(backend)
    if want == "cudnn":
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return "xla", f"cuDNN flash attention needs bfloat16/float16, not {jnp.dtype(dtype).name}"
        if head_dim % 8 or head_dim > 128:
            return "xla", f"cuDNN needs a head dim that is a multiple of 8 and <= 128, not {head_dim}"
        if packed and not packed_on_cudnn:
            return "xla", "cuDNN packed rows need a Hopper (sm90+) GPU"
        if bidirectional_window:
            return "xla", "cuDNN windows are left-only (causal)"
        if pattern is not None:
            return "xla", f"cuDNN has no {pattern.kind} pattern (only causal and left windows)"
        return "cudnn", "packed rows as per-sequence lengths and offsets" if packed else "fused kernel"
    if want in ("splash", "splash_interpret"):
        if q_len % fused.LANES or kv_len % fused.LANES:
            return "xla", f"splash needs lengths that are multiples of {fused.LANES}, not {q_len}x{kv_len}"
        if pattern is not None and pattern.kind == "bigbird" and pattern.block % fused.LANES:
            return "xla", f"splash needs bigbird blocks in multiples of {fused.LANES}, not {pattern.block}"
        return want, "segment ids in the kernel" if packed else "fused kernel"
    return "xla", f"no fused kernel on {backend}"


def target_backend() -> str:
    """ "gpu", "tpu" or "cpu": where the traced code will run.

    The platform of the mesh set with `jax.set_mesh` when it has devices (a compile for a TPU or GPU
    topology from a CPU-only machine), else JAX's default backend.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _announce(message: str) -> None:
    """Log each distinct attention path once per process (at trace time, never per call)."""
    if message not in _announced:
        _announced.add(message)
        logging.getLogger("flaxformer_lite.attention").info("attention: %s", message)


def dot_product_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Bool[Array, "#B #N T S"] | None = None,
    bias: Float[Array, "#B #N T S"] | None = None,
    is_causal: bool = False,
    segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    local_window: int | None = None,
    pattern: AttentionPattern | None = None,
    max_segments: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | None = None,
    scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """softmax(q k^T * scale + bias) v with fp32 softmax: [B,T,N,H], [B,S,K,H] x2 -> [B,T,N,H].

    Args:
      q, k, v: queries [B, T, N, H]; keys and values [B, S, K, H] with N % K == 0 (GQA/MQA).
      mask: optional bool [B or 1, N or 1, T, S], True = attend.
      bias: optional float [B or 1, N or 1, T, S] added to the logits (relative positions, ALiBi).
      is_causal: query i sees keys 0..i (by index; with packing, combine with segment_ids).
      segment_ids: int [B, T] ids of packed sequences (0 = padding); queries see only keys of the
        same id, and the output at padding queries is 0 on every path. kv_segment_ids [B, S] gives
        the keys' ids when they differ (cross-attention: query sequence j meets key sequence j).
      local_window: keys fewer than this many positions from the query (left-only with causal).
      pattern: a sparse pattern (`ops.patterns.AttentionPattern`: local, longformer, bigbird,
        chunked) over row indices, ANDed with the rest; a local pattern is `local_window`.
      max_segments: most sequences in one row (static; the packer's cap). cuDNN sizes its packed
        layout by it; 1 means unpacked rows padded at the end. None: T.
      dropout_rate, dropout_rng: dropout on the attention probabilities (forces "reference").
      scale: the logit scale; None is 1/sqrt(H) (T5 uses 1.0).
      implementation: None chooses per backend (`choose_implementation`): cuDNN on GPU, splash on
        TPU, XLA otherwise or when a mask/bias is given. Or force "xla", "cudnn", "splash",
        "splash_interpret" or "reference" (plain einsum: tests and attention dropout).
    """
    dropout_active = dropout_rate > 0.0 and dropout_rng is not None
    _check_inputs(q, k, v, implementation, dropout_active)
    if pattern is not None and pattern.kind in ("full", "local"):  # the window kernels serve these
        if pattern.kind == "local" and local_window is not None:
            raise ValueError("both local_window and a local pattern given: pass one of them.")
        local_window = pattern.window if pattern.kind == "local" else local_window
        pattern = None
    T, S = q.shape[1], k.shape[1]
    max_segments = T if max_segments is None else max_segments
    packed = segment_ids is not None and max_segments > 1
    impl, why = choose_implementation(
        target_backend(),
        dtype=q.dtype,
        head_dim=q.shape[3],
        q_len=T,
        kv_len=S,
        has_mask=mask is not None,
        has_bias=bias is not None,
        dropout=dropout_active,
        packed=packed,
        packed_on_cudnn=not packed or fused.cudnn_supports_packing(),
        bidirectional_window=local_window is not None and not is_causal,
        pattern=pattern,
        requested=implementation,
    )
    _announce(f"q{tuple(q.shape)} kv{tuple(k.shape)} {q.dtype}: {impl} ({why})")

    if impl == "cudnn":
        return fused.cudnn_attention(
            q, k, v, is_causal=is_causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
            local_window=local_window, max_segments=max_segments, scale=scale,
        )  # fmt: skip
    if impl in ("splash", "splash_interpret"):
        return fused.splash_attention(
            q, k, v, is_causal=is_causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
            local_window=local_window, interpret=impl == "splash_interpret", scale=scale, pattern=pattern,
        )  # fmt: skip
    if impl == "reference" or segment_ids is not None or mask is not None or pattern is not None:
        full = _full_mask(q, k, mask, is_causal, segment_ids, kv_segment_ids, local_window, pattern)
        if impl == "reference":
            out = reference_attention(
                q, k, v, mask=full, bias=bias, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                scale=scale,
            )  # fmt: skip
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, bias=bias, mask=full, scale=scale, implementation="xla"
            )
        return fused.zero_padding_queries(out, segment_ids)
    return _xla_windowed(q, k, v, bias=bias, is_causal=is_causal, local_window=local_window, scale=scale)


def _check_inputs(q, k, v, implementation, dropout_active: bool) -> None:
    """One-line errors for shapes that do not fit together and for impossible requests."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; use one of {IMPLEMENTATIONS}.")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q [B,T,N,H] and k, v [B,S,K,H]; got q{q.shape} k{k.shape} v{v.shape}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q{q.shape} and k{k.shape} disagree: batch and head dim must match and the "
            "query heads must be a multiple of the key/value heads."
        )
    if dropout_active and implementation not in (None, "reference"):
        raise ValueError(
            f"attention dropout needs implementation='reference', not {implementation!r}; "
            "set the attention dropout rate to 0 to use the fused kernels."
        )


def _xla_windowed(q, k, v, *, bias, is_causal: bool, local_window: int | None, scale):
    """XLA attention without a mask array: causality and the window as jax's own arguments."""
    window = None if local_window is None else (local_window - 1, local_window - 1)
    if is_causal and window is not None:
        window = (window[0], 0)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, is_causal=is_causal, local_window_size=window, scale=scale, implementation="xla"
    )
