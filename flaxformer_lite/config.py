"""One frozen ModelConfig for every model family, validated on construction, and presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flaxformer_lite.ops.activations import ACTIVATIONS, GATED_ACTIVATIONS
from flaxformer_lite.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from flaxformer_lite.ops.patterns import PATTERNS, AttentionPattern, pattern_problem
from flaxformer_lite.ops.positions import SINUSOID_LAYOUTS

NORMS = ("layernorm", "rmsnorm")
POOLINGS = ("auto", "first", "last", "mean")
POSITIONS = ("learned", "sinusoidal", "rope", "relative", "alibi", "none")
# Activation checkpointing per layer: name -> jax.checkpoint policy ("full": save nothing).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a Transformer; variants are fields, not subclasses."""

    vocab_size: int = 32_000  # shared by source and target (one joint SentencePiece model)
    d_model: int = 512  # width of the residual stream ("embed")
    num_heads: int = 8  # query heads
    num_kv_heads: int | None = None  # None = num_heads (MHA); 1 = MQA; a divisor = GQA
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 2048  # hidden width of the feed-forward block ("mlp")
    num_encoder_layers: int = 6  # unused by DecoderOnly
    num_decoder_layers: int = 6  # the layers of DecoderOnly, or the decoder of EncoderDecoder
    activation: str = "relu"  # relu | gelu | gelu_tanh | silu | swiglu | geglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-6
    pre_norm: bool = False  # False: post-LN as in the paper; True: pre-LN plus a final norm
    position: str = "sinusoidal"  # learned | sinusoidal | rope | relative | alibi | none
    max_len: int = 512  # learned table size and the longest KV cache
    sinusoid_layout: str = "interleaved"  # interleaved (the paper's) | concat (sin half, cos half: Marian)
    rope_theta: float = 10_000.0
    relative_buckets: int = 32  # T5 relative-position buckets (position="relative")
    relative_max_distance: int = 128
    shared_relative_bias: bool = False  # True: one relative-bias table per stack, shared by its layers (T5)
    scale_attention: bool = True  # False: no 1/sqrt(head_dim) on attention logits (T5 folds it into init)
    local_window: int | None = None  # sliding-window self-attention span, None = global
    # Sparse self-attention (ops/patterns.py; encoders bidirectional, decoders causal, cross-attention
    # full): full | local | longformer | bigbird | chunked. local = local_window=pattern_window.
    attention_pattern: str = "full"
    pattern_window: int = 0  # local/longformer: |q - k| < window; bigbird: in tokens; chunked: chunk length
    # longformer: the first G tokens of a row, or a tuple of positions, see and are seen by every
    # token; bigbird: the first G tokens (a multiple of pattern_block)
    global_tokens: int | tuple[int, ...] = 0
    pattern_block: int = 128  # bigbird's block (a multiple of 128 for splash; window a multiple of it)
    random_blocks: int = 0  # bigbird: random key blocks per query block
    pattern_seed: int = 0  # bigbird: the random blocks' seed (drawn once: the same blocks every step)
    use_bias: bool = True  # biases in the dense layers and LayerNorm
    tie_embeddings: bool = True  # output logits through the transposed token embedding
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model), as the paper
    source_vocab_size: int | None = None  # EncoderDecoder: None = one embedding shared with the target
    logits_bias: bool = (
        False  # a learned bias on the output logits (Marian's final_logits_bias, BERT's MLM bias)
    )
    type_vocab_size: int = 0  # > 0: learned token-type (segment A/B) embeddings in the encoder (BERT)
    embedding_norm: bool = False  # a norm on the summed embeddings, before dropout (BERT)
    rescale_tied_logits: bool = False  # tied logits from x * d_model**-0.5 (T5 v1.0)
    init_std: float | None = None  # None: Xavier-uniform dense, d_model**-0.5 embeddings; else N(0, std)
    dropout_rate: float = 0.1  # residual and embedding dropout
    attention_dropout_rate: float = 0.0  # > 0 forces the einsum attention path (no fused kernel)
    num_classes: int = 2  # classification heads (EncoderOnly's; DecoderOnly.classify)
    # Which final states a classification head reads: auto (first token for EncoderOnly, last real
    # token for DecoderOnly) | first | last | mean (see ops.pooling)
    pooling: str = "auto"
    dtype: Any = jnp.float32  # compute dtype (bfloat16 for mixed precision)
    param_dtype: Any = jnp.float32  # parameters (and so optimizer state) stay float32
    attention_impl: str | None = None  # None (choose per backend) | xla | cudnn | splash | reference
    # Self-attention when the mesh splits the sequence (mesh_context > 1): all_gather (K/V gathered)
    # | ring (K/V passed around the context axis); see ops/context_parallel.py
    context_strategy: str = "all_gather"
    max_segments: int = 32  # most packed sequences per row (the packer's cap; 1 = unpacked, padded)
    scan_layers: bool = False  # nn.scan over layers: faster compiles, params stacked on "layers"
    remat_policy: str = "none"  # none | full | dots | dots_no_batch (activation checkpointing)
    deterministic: bool = False  # True disables dropout (eval, decoding)
    decode: bool = False  # True: incremental decoding with a KV cache in the "cache" collection
    # > 0: Transformer-XL memory (decoder-only LMs): causal self-attention also sees the keys/values of
    # the last memory_length positions of the previous segments (the "memory" collection, model/memory.py)
    memory_length: int = 0

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("dtype", jnp.dtype(self.dtype))
        set_("param_dtype", jnp.dtype(self.param_dtype))
        _check(self.vocab_size > 0, "vocab_size", self.vocab_size, "use a positive vocabulary size")
        _check(self.d_model > 0, "d_model", self.d_model, "use a positive width")
        _check(self.num_heads > 0, "num_heads", self.num_heads, "use at least one head")
        if self.head_dim is None:
            _check(
                self.d_model % self.num_heads == 0,
                "num_heads",
                self.num_heads,
                f"pick a divisor of d_model={self.d_model} or set head_dim explicitly",
            )
            set_("head_dim", self.d_model // self.num_heads)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        _check(
            0 < self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"pick a divisor of num_heads={self.num_heads} (1 = MQA, num_heads = MHA)",
        )
        _check_choices(self)
        if self.source_vocab_size is not None:
            _check(
                self.source_vocab_size > 0,
                "source_vocab_size",
                self.source_vocab_size,
                "use None (shared vocabulary) or a positive size",
            )
        _check(self.type_vocab_size >= 0, "type_vocab_size", self.type_vocab_size, "use 0 (none) or more")
        for name in ("dropout_rate", "attention_dropout_rate"):
            rate = getattr(self, name)
            _check(0.0 <= rate < 1.0, name, rate, "use a rate in [0, 1)")
        for name in ("d_ff", "max_len", "num_classes", "max_segments"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "use a positive value")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 or more layers")
        if self.position == "rope":
            _check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "RoPE needs an even head_dim")
        if self.position == "sinusoidal":
            _check(
                self.d_model % 2 == 0, "d_model", self.d_model, "sinusoidal positions need an even d_model"
            )
        if self.local_window is not None:
            _check(self.local_window > 0, "local_window", self.local_window, "use None or a positive span")
        _check_context(self)
        _check_memory(self)
        _check_pattern(self)

    @property
    def pattern(self) -> AttentionPattern | None:
        """The self-attention pattern as `ops.dot_product_attention` takes it (None: full)."""
        if self.attention_pattern == "full":
            return None
        return AttentionPattern(
            self.attention_pattern,
            self.pattern_window,
            self.global_tokens,
            self.pattern_block,
            self.random_blocks,
            self.pattern_seed,
        )

    @property
    def gated(self) -> bool:
        """Whether the feed-forward block is a GLU (two input projections)."""
        return self.activation in GATED_ACTIVATIONS

    def replace(self, **changes) -> ModelConfig:
        """A copy with fields changed, validated again (e.g. `.replace(decode=True)`)."""
        return dataclasses.replace(self, **changes)


def _check_memory(cfg: ModelConfig) -> None:
    """Transformer-XL memory needs positions that work across segments and the einsum attention."""
    _check(cfg.memory_length >= 0, "memory_length", cfg.memory_length, "use 0 (off) or a positive length")
    if not cfg.memory_length:
        return
    _check(
        cfg.position in ("rope", "relative", "alibi", "none"),
        "memory_length",
        cfg.memory_length,
        f"memory needs relative positions, not position={cfg.position!r}: use rope, relative, alibi or none",
    )
    _check(
        cfg.attention_dropout_rate == 0.0,
        "memory_length",
        cfg.memory_length,
        "memory attention has no attention dropout: set attention_dropout_rate to 0",
    )


def _check_context(cfg: ModelConfig) -> None:
    """The context-parallel attention strategy is one of ops.context_parallel.STRATEGIES."""
    strategies = ("all_gather", "ring")
    strategy = cfg.context_strategy
    _check(strategy in strategies, "context_strategy", strategy, f"use one of {strategies}")


def _check_pattern(cfg: ModelConfig) -> None:
    """A known pattern with consistent fields; not with local_window; splash needs 128-blocks."""
    if isinstance(cfg.global_tokens, list):  # from a command-line or ml_collections override
        object.__setattr__(cfg, "global_tokens", tuple(cfg.global_tokens))
    kind = cfg.attention_pattern
    _check(kind in PATTERNS, "attention_pattern", kind, f"use one of {PATTERNS}")
    if kind == "full":
        return
    _check(
        cfg.local_window is None,
        "local_window",
        cfg.local_window,
        f"set local_window=None with attention_pattern={kind!r} (local_window is the local pattern)",
    )
    fields = (cfg.pattern_window, cfg.global_tokens, cfg.pattern_block, cfg.random_blocks, cfg.pattern_seed)
    problem = pattern_problem(kind, *fields)
    names = "pattern_window, global_tokens, pattern_block, random_blocks, pattern_seed"
    _check(problem is None, "attention_pattern", kind, f"{problem} (ModelConfig fields {names})")
    if kind == "bigbird" and cfg.attention_impl in ("splash", "splash_interpret"):
        _check(cfg.pattern_block % 128 == 0, "pattern_block", cfg.pattern_block, "splash needs 128-multiples")
    memory_fix = (
        "bigbird's block map needs positions below the row length; memory positions grow: use another"
    )
    _check(not (cfg.memory_length and kind == "bigbird"), "attention_pattern", kind, memory_fix)


def _check_choices(cfg: ModelConfig) -> None:
    """The fields that name one of a fixed set of options."""
    choices = {
        "activation": tuple(sorted(ACTIVATIONS) + sorted(GATED_ACTIVATIONS)),
        "norm": NORMS,
        "position": POSITIONS,
        "sinusoid_layout": SINUSOID_LAYOUTS,
        "remat_policy": tuple(REMAT_POLICIES),
        "attention_impl": ATTENTION_IMPLS,
        "pooling": POOLINGS,
    }
    for name, options in choices.items():
        value = getattr(cfg, name)
        _check(value in options, name, value, f"use one of {options}")


def _check(ok: bool, field: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}={value!r} is invalid: {fix}.")


def transformer_base(vocab_size: int = 32_000, **overrides) -> ModelConfig:
    """Vaswani et al. 2017 base: N=6, d=512, h=8, d_ff=2048, dropout 0.1, shared vocab."""
    return ModelConfig(vocab_size=vocab_size, **overrides)


def transformer_big(vocab_size: int = 32_000, **overrides) -> ModelConfig:
    """Vaswani et al. 2017 big: d=1024, h=16, d_ff=4096, dropout 0.3."""
    fields = dict(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
    return ModelConfig(vocab_size=vocab_size, **{**fields, **overrides})


def gpt2_small(vocab_size: int = 50_257, **overrides) -> ModelConfig:
    """GPT-2 124M: 12 pre-LN layers, d=768, h=12, learned positions (1024), tied, gelu_tanh."""
    fields = dict(
        d_model=768,
        num_heads=12,
        d_ff=3072,
        num_encoder_layers=0,
        num_decoder_layers=12,
        activation="gelu_tanh",
        norm_eps=1e-5,
        pre_norm=True,
        position="learned",
        max_len=1024,
        scale_embeddings=False,
        init_std=0.02,
    )
    return ModelConfig(vocab_size=vocab_size, **{**fields, **overrides})


def llama_small(vocab_size: int = 32_000, **overrides) -> ModelConfig:
    """LLaMA-style 125M: RMSNorm, SwiGLU, RoPE, GQA (12 query / 4 kv heads), no biases, untied."""
    fields = dict(
        d_model=768,
        num_heads=12,
        num_kv_heads=4,
        d_ff=2048,
        num_encoder_layers=0,
        num_decoder_layers=12,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        pre_norm=True,
        position="rope",
        max_len=2048,
        use_bias=False,
        tie_embeddings=False,
        scale_embeddings=False,
        init_std=0.02,
        dropout_rate=0.0,
    )
    return ModelConfig(vocab_size=vocab_size, **{**fields, **overrides})


def tiny(vocab_size: int = 67, **overrides) -> ModelConfig:
    """Test-sized: prime-ish dims so a swapped axis cannot pass (d=24, 4 heads of 6, 2 kv heads)."""
    fields = dict(
        d_model=24,
        num_heads=4,
        num_kv_heads=2,
        d_ff=40,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_len=32,
        dropout_rate=0.0,
    )
    return ModelConfig(vocab_size=vocab_size, **{**fields, **overrides})


PRESETS = {
    "transformer_base": transformer_base,
    "transformer_big": transformer_big,
    "gpt2_small": gpt2_small,
    "llama_small": llama_small,
    "tiny": tiny,
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name with fields overridden, e.g. `preset("tiny", position="rope")`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; use one of {sorted(PRESETS)}.")
    return PRESETS[name](**overrides)
