"""Pure JAX functions (no Flax): attention and masks, positions, norms, activations, losses, MLM masking."""

from flaxformer_lite.ops.activations import ACTIVATIONS, GATED_ACTIVATIONS, gated
from flaxformer_lite.ops.attention import (
    cached_attention,
    causal_mask,
    choose_implementation,
    combine_masks,
    dot_product_attention,
    padding_mask,
    reference_attention,
    segment_mask,
    sliding_window_mask,
)
from flaxformer_lite.ops.dropout import dropout
from flaxformer_lite.ops.fused import segment_layout
from flaxformer_lite.ops.logits import tied_logits
from flaxformer_lite.ops.losses import accuracy, cross_entropy, token_losses
from flaxformer_lite.ops.masking import mlm_mask
from flaxformer_lite.ops.norms import layer_norm, rms_norm
from flaxformer_lite.ops.patterns import (
    PATTERNS,
    AttentionPattern,
    bigbird_mask,
    chunked_mask,
    local_mask,
    longformer_mask,
    pattern_mask,
)
from flaxformer_lite.ops.positions import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    relative_position_bias,
    relative_position_bucket,
    sinusoidal_embedding,
    sinusoidal_table,
)
from flaxformer_lite.ops.sequences import shift_right

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "PATTERNS",
    "AttentionPattern",
    "accuracy",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "bigbird_mask",
    "cached_attention",
    "causal_mask",
    "chunked_mask",
    "choose_implementation",
    "combine_masks",
    "cross_entropy",
    "dot_product_attention",
    "dropout",
    "gated",
    "layer_norm",
    "local_mask",
    "longformer_mask",
    "mlm_mask",
    "padding_mask",
    "pattern_mask",
    "reference_attention",
    "relative_position_bias",
    "relative_position_bucket",
    "rms_norm",
    "segment_layout",
    "segment_mask",
    "shift_right",
    "sinusoidal_embedding",
    "sinusoidal_table",
    "sliding_window_mask",
    "tied_logits",
    "token_losses",
]
