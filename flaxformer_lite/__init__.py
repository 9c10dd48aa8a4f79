"""flaxformer_lite: Transformer ops, Flax Linen layers and models for translation and LMs.

`flaxformer_lite.ops` and `flaxformer_lite.config` need only JAX; the Linen layers and models
load (with Flax) the first time one of their names is used.
"""

import importlib

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

__version__ = "0.1.0"

_LAZY = {
    "AXES": "sharding",
    "DecoderLayer": "model.blocks",
    "Embed": "model.layers",
    "EncoderLayer": "model.blocks",
    "Mlp": "model.layers",
    "MultiHeadAttention": "model.attention",
    "Norm": "model.layers",
    "Decoder": "model.models",
    "DecoderOnly": "model.models",
    "Encoder": "model.models",
    "EncoderDecoder": "model.models",
    "EncoderOnly": "model.models",
}


def __getattr__(name):
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(f"flaxformer_lite.{_LAZY[name]}"), name)
        return value  # kept: later lookups (and pdoc, which reads the module's __dict__) find it there
    raise AttributeError(f"module 'flaxformer_lite' has no attribute {name!r}")


__all__ = [
    "ModelConfig",
    "PRESETS",
    "gpt2_small",
    "llama_small",
    "ops",
    "preset",
    "tiny",
    "transformer_base",
    "transformer_big",
    *_LAZY,
]
