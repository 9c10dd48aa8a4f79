"""flaxformer_lite: Transformer ops, Flax Linen layers and models for translation and LMs."""

from flaxformer_lite import ops
from flaxformer_lite.config import (
    PRESETS,
    ModelConfig,
    gpt2_small,
    llama_small,
    preset,
    tiny,
    transformer_base,
    transformer_big,
)
from flaxformer_lite.layers import (
    AXES,
    DecoderLayer,
    Embed,
    EncoderLayer,
    Mlp,
    MultiHeadAttention,
    Norm,
)
from flaxformer_lite.models import Decoder, DecoderOnly, Encoder, EncoderDecoder, EncoderOnly

__version__ = "0.1.0"

__all__ = [
    "AXES",
    "Decoder",
    "DecoderLayer",
    "DecoderOnly",
    "Embed",
    "Encoder",
    "EncoderDecoder",
    "EncoderLayer",
    "EncoderOnly",
    "Mlp",
    "ModelConfig",
    "MultiHeadAttention",
    "Norm",
    "PRESETS",
    "gpt2_small",
    "llama_small",
    "ops",
    "preset",
    "tiny",
    "transformer_base",
    "transformer_big",
]
