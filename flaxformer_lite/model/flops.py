"""Matmul FLOPs of our models, for MFU: a documented closed form, checked against XLA's count.

Counted: every matmul (2 FLOPs per multiply-add) of the forward pass, including attention scores
and the weighted sum over the *full* key length (causal masking does not halve them: the fused
kernels and XLA both compute the masked half), and the vocabulary projection. Not counted:
normalisation, activations, softmax, embeddings lookups (memory ops, a few % of the total).
Training is 3x the forward (the backward pass is two matmuls per forward matmul); activation
recomputation (remat) is real work the hardware does but not useful work, so MFU excludes it.

Per token, with D = d_model, N/K query/kv heads of size H, F = d_ff, V = vocab, G = 3 if gated else 2:
  self-attention layer over L keys: 2*D*H*(2N + 2K) + 4*L*N*H
  feed-forward layer:               2*G*D*F
  output logits:                    2*D*V
An encoder-decoder step adds, per target token and decoder layer, cross-attention queries/output
(4*D*N*H) and scores over the S source positions (4*S*N*H), and per *source* token and decoder
layer the cross keys/values (4*D*K*H). Source and target tokens are never counted twice: encoder
costs are per source token, decoder costs per target token.
"""

from __future__ import annotations

from flaxformer_lite.config import ModelConfig


def _projections(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)


def _scores(cfg: ModelConfig, keys: int) -> int:
    return 4 * keys * cfg.num_heads * cfg.head_dim


def _mlp(cfg: ModelConfig) -> int:
    return 2 * (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff


def forward_flops(cfg: ModelConfig, target_len: int, source_len: int = 0) -> int:
    """Matmul FLOPs of one forward pass over one sequence (a source/target pair if source_len)."""
    decoder_layer = _projections(cfg) + _scores(cfg, target_len) + _mlp(cfg)
    total = target_len * (cfg.num_decoder_layers * decoder_layer + 2 * cfg.d_model * cfg.vocab_size)
    if source_len:
        encoder_layer = _projections(cfg) + _scores(cfg, source_len) + _mlp(cfg)
        total += source_len * cfg.num_encoder_layers * encoder_layer
        cross_q_out = 4 * cfg.d_model * cfg.num_heads * cfg.head_dim
        cross_kv = 4 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim
        total += cfg.num_decoder_layers * (
            target_len * (cross_q_out + _scores(cfg, source_len)) + source_len * cross_kv
        )
    return total


def encoder_forward_flops(cfg: ModelConfig, length: int) -> int:
    """Matmul FLOPs of an EncoderOnly forward over one sequence (MLM head included)."""
    layer = _projections(cfg) + _scores(cfg, length) + _mlp(cfg)
    head = 2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.vocab_size
    return length * (cfg.num_encoder_layers * layer + head)


def train_flops(cfg: ModelConfig, target_len: int, source_len: int = 0) -> int:
    """Useful training FLOPs per sequence: forward + backward = 3 x forward."""
    return 3 * forward_flops(cfg, target_len, source_len)


PEAK_BF16_TFLOPS = {  # dense, per chip, from the vendors' data sheets
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of a device from its `device_kind` string, or None if unknown (CPU)."""
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in device_kind.upper():
            return peak
    return None


def attention_flops(
    cfg: ModelConfig, target_len: int, source_len: int = 0, *, encoder_only: bool = False
) -> int:
    """The attention-score part of `forward_flops` (or of `encoder_forward_flops`) per sequence:
    what a fused attention kernel computes, which XLA's cost analysis does not see inside it."""
    if encoder_only:
        return target_len * cfg.num_encoder_layers * _scores(cfg, target_len)
    total = target_len * cfg.num_decoder_layers * _scores(cfg, target_len)
    if source_len:
        total += source_len * cfg.num_encoder_layers * _scores(cfg, source_len)
        total += target_len * cfg.num_decoder_layers * _scores(cfg, source_len)
    return total
