"""What differs between tasks, one record each: translation, language modelling, masked LM,
classification (BERT-style and GPT-style; the details are in classification.py).

A `Task` says which model family it trains, which batch features it reads, how a batch becomes
model arguments, logits and loss weights, and how it is evaluated and decoded. Code outside this
file asks the record; it never compares task names. Adding a task is adding one record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_lite import decoding, ops, sharding
from flaxformer_lite.ids import EOS_ID, MASK_ID, PAD_ID, UNK_ID
from flaxformer_lite.model.models import DecoderOnly, EncoderDecoder, EncoderOnly
from flaxformer_lite.tasks import classification

Array = jax.Array

MLM_MASK_RATE = 0.15  # BERT: the share of the real tokens (not special, not padding) predicted
MLM_REPLACE = (0.8, 0.1, 0.1)  # BERT: of those, the shares made <mask>, a random token, kept as they are
# Never selected nor drawn as a random token: padding (also [CLS] in pairs), EOS ([SEP]), unknown, <mask>.
MLM_SPECIAL_IDS = (PAD_ID, EOS_ID, UNK_ID, MASK_ID)


@dataclasses.dataclass(frozen=True)
class Task:
    """A training objective and how to evaluate and decode it."""

    name: str
    model_class: type[nn.Module]
    features: tuple[str, ...]  # batch features: "inputs" (source) and/or "targets"
    forward: Callable  # (model, params, batch, rng, decoder_inputs) -> (logits, targets, weights)
    translates: bool = False  # evaluated by BLEU/chrF on decoded text; scheduled sampling applies
    generates: bool = False  # continues prompts (generate.py)
    classifies: bool = False  # one label per text or pair (classification.py: data, eval, generate)
    init_with: Callable | None = None  # (model, rng, batch) -> variables, when not model.init(batch)

    @property
    def paired(self) -> bool:
        """Whether examples are (source, target) pairs, read from a dataset's supervised keys."""
        return "inputs" in self.features

    def example_batch(self, batch_size: int, length: int) -> dict:
        """A zero batch with this task's keys and shapes (for init and shape checks)."""
        z = jnp.zeros((batch_size, length), jnp.int32)
        return {f"{n}{s}": z for n in self.features for s in ("", "_segment_ids", "_positions")}

    def init(self, model: nn.Module, rng: Array, batch: dict) -> dict:
        """Variables of `model` initialised on `batch`."""
        if self.init_with is not None:
            return self.init_with(model, rng, batch)
        args, kwargs = model_args(batch, batch["targets"])
        return model.init(rng, *args, **kwargs)


def model_args(batch: dict, decoder_inputs: Array) -> tuple[tuple, dict]:
    """Positional and keyword model arguments for a batch (with a source if it has "inputs")."""
    if "inputs" in batch:
        return (batch["inputs"], decoder_inputs), dict(
            inputs_segment_ids=batch["inputs_segment_ids"],
            inputs_positions=batch["inputs_positions"],
            decoder_segment_ids=batch["targets_segment_ids"],
            decoder_positions=batch["targets_positions"],
        )
    return (decoder_inputs,), dict(
        segment_ids=batch["targets_segment_ids"], positions=batch["targets_positions"]
    )


def _next_token_forward(model, params, batch, rng, decoder_inputs=None):
    """Predict each target token from the ones before it (and the source, if any)."""
    targets = batch["targets"]
    weights = (batch["targets_segment_ids"] > 0).astype(jnp.float32)
    if decoder_inputs is None:
        decoder_inputs = ops.shift_right(targets, batch["targets_segment_ids"])
    args, kwargs = model_args(batch, decoder_inputs)
    logits = model.apply({"params": params}, *args, rngs={"dropout": rng}, **kwargs)
    return logits, targets, weights


def _masked_lm_forward(model, params, batch, rng, decoder_inputs=None):
    """BERT: select MLM_MASK_RATE of the real tokens, corrupt them 80/10/10 (`ops.mlm_mask`), predict
    them (weights only on the selected ones); with next-sentence pairs, also "is b the text after a?"."""
    del decoder_inputs
    targets, segments = batch["targets"], batch["targets_segment_ids"]
    mask_rng, rng = jax.random.split(rng)
    inputs, weights = ops.mlm_mask(
        mask_rng, targets, vocab_size=model.config.vocab_size, special_ids=MLM_SPECIAL_IDS,
        mask_id=MASK_ID, eligible=segments > 0, rate=MLM_MASK_RATE, replace=MLM_REPLACE,
    )  # fmt: skip
    if "labels" in batch:  # next-sentence pairs (config.next_sentence): BERT's two objectives
        return classification.masked_lm_and_next_sentence(model, params, batch, inputs, weights, rng)
    logits, _ = model.apply(
        {"params": params}, inputs, segment_ids=segments, positions=batch["targets_positions"],
        rngs={"dropout": rng},
    )  # fmt: skip
    return logits, targets, weights


TRANSLATION = Task("translation", EncoderDecoder, ("inputs", "targets"), _next_token_forward, translates=True)
LM = Task("lm", DecoderOnly, ("targets",), _next_token_forward, generates=True)
MLM = Task("mlm", EncoderOnly, ("targets",), _masked_lm_forward)
# Classification (issue 30): BERT-style (first token) and GPT-style (last real token or mean).
_CLASSIFY = dict(
    features=("targets", "token_types", "labels"), forward=classification.classify_forward,
    classifies=True, init_with=classification.classify_init,
)  # fmt: skip
CLASSIFY = Task("classify", EncoderOnly, **_CLASSIFY)
CLASSIFY_CAUSAL = Task("classify_causal", DecoderOnly, **_CLASSIFY)
TASKS = {t.name: t for t in (TRANSLATION, LM, MLM, CLASSIFY, CLASSIFY_CAUSAL)}


def get(name: str) -> Task:
    """The task record for a config's `task` field."""
    if name not in TASKS:
        raise ValueError(f"bad config: task={name!r}; use one of {sorted(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------------------ decoding


def translate_fn(
    model,
    *,
    beam_size: int,
    alpha: float,
    max_decode_length: int,
    length_penalty: str = "gnmt",
    outputs: bool = False,
    attention: decoding.Attention | None = None,
    ensemble_mode: str = "log",
) -> Callable:
    """Jitted (params, [B, S] source ids[, [B, L] forced prefix ids]) -> [B, max_decode_length] ids:
    beam search (1 = greedy); with `outputs`, `decoding.translate_outputs`'s dict (n-best, scores,
    per-token log-probs, attention).

    `model` and `params` may be lists: an ensemble (`ensemble_mode` "log" or "prob"). Each output
    may be up to 1.5x its source + 10 tokens long (and at most max_decode_length), or its forced
    prefix + 1. length_penalty: "gnmt" or "hf" (transformers' generate; see `decoding.beam_search`).
    """

    def decode(params, inputs, forced=None):
        limit = None
        if beam_size > 1:
            src_len = jnp.sum(inputs != 0, axis=1)
            limit = (src_len * 3) // 2 + 10
            if forced is not None:
                limit = jnp.maximum(limit, jnp.sum(forced > 0, axis=1) + 1)
            limit = jnp.minimum(limit, max_decode_length)
        out = decoding.translate_outputs(
            model, params, inputs, max_decode_length, beams=beam_size, alpha=alpha, max_lengths=limit,
            penalty=length_penalty, forced=forced, attention=attention, ensemble_mode=ensemble_mode,
        )  # fmt: skip
        return out if outputs else out["tokens"][:, 0]

    return jax.jit(sharding.under_rules(decode))


def continue_fn(model, *, max_new_tokens: int, **sample_kwargs) -> Callable:
    """Jitted (params, [B, P] prompt ids, rng) -> [B, max_new_tokens] sampled continuation."""
    return jax.jit(
        sharding.under_rules(
            lambda params, prompt, rng: decoding.lm_generate(
                model, params, prompt, max_new_tokens, rng=rng, **sample_kwargs
            )
        )
    )
