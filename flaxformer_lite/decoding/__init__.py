"""Autoregressive decoding: greedy/sampling (`sampling`), beam search (`beam`), and the step
functions of our models with the KV cache (`steps`).

Every decoder runs over a step function `(tokens [B, 1], cache) -> (logits [B, V], cache)`.
"""

from flaxformer_lite.decoding.beam import (
    LENGTH_PENALTIES,
    NEG_INF,
    beam_search,
    beam_search_outputs,
    check_options,
    length_penalty,
)
from flaxformer_lite.decoding.sampling import (
    STAGED_STEPS,
    sample,
    sample_outputs,
    strip_after_eos,
)
from flaxformer_lite.decoding.steps import (
    ENSEMBLE_MODES,
    Attention,
    ensemble_step_fn,
    lm_generate,
    lm_generate_outputs,
    translate,
    translate_beam,
    translate_outputs,
    translation_step_fn,
)
from flaxformer_lite.ids import EOS_ID, PAD_ID

__all__ = [
    "ENSEMBLE_MODES",
    "Attention",
    "beam_search_outputs",
    "ensemble_step_fn",
    "lm_generate_outputs",
    "sample_outputs",
    "translate_outputs",
    "EOS_ID",
    "LENGTH_PENALTIES",
    "NEG_INF",
    "PAD_ID",
    "STAGED_STEPS",
    "beam_search",
    "check_options",
    "length_penalty",
    "lm_generate",
    "sample",
    "strip_after_eos",
    "translate",
    "translate_beam",
    "translation_step_fn",
]
