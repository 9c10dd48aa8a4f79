"""Step functions of our models with the KV cache, ensembles of them, and the decoders built on them.

A step function maps `(tokens [rows, 1], cache) -> (logits [rows, V], cache)`; asked for attention
(`Attention`), a translation step function also returns the cross-attention weights of that step
[rows, A, S], read from the cached decode path (no second forward pass).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from flaxformer_lite.decoding.beam import beam_search_outputs, length_penalty
from flaxformer_lite.decoding.sampling import call_step, sample, sample_outputs
from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.model.models import variant

ENSEMBLE_MODES = ("log", "prob")


@dataclasses.dataclass(frozen=True)
class Attention:
    """Which cross-attention weights a decoder keeps per target token: one layer (negative counts
    from the last) or all (None); one head or the mean over heads (None)."""

    layer: int | None = -1
    head: int | None = None


def _cross_attention(intermediates: dict, spec: Attention) -> jax.Array:
    """The sown cross-attention weights of one decode step -> [rows, A, S] (A: 1, or every layer)."""
    found = []  # (layer order, [layers, rows, 1, N, S])
    for path, x in jax.tree_util.tree_leaves_with_path(intermediates):
        names = [getattr(k, "key", None) for k in path]
        if "cross_attention_weights" not in names:
            continue
        scanned = "layers" in names  # nn.scan stacks the layers on axis 0
        order = -1 if scanned else int(next(n for n in names if str(n).startswith("layer_"))[6:])
        found.append((order, x if scanned else x[None]))
    if not found:
        raise ValueError("this model has no cross-attention to read (attention is for translation models).")
    w = jnp.concatenate([x for _, x in sorted(found, key=lambda f: f[0])], axis=0)[
        :, :, 0
    ]  # [layers, rows, N, S]
    w = w.mean(axis=2) if spec.head is None else w[:, :, spec.head]
    w = jnp.swapaxes(w, 0, 1)  # [rows, layers, S]
    return w if spec.layer is None else w[:, spec.layer][:, None]


def translation_step_fn(
    model, params, inputs: jax.Array, max_len: int, beams: int = 1, attention: Attention | None = None
):
    """(step_fn, cache) for an EncoderDecoder: encode once, project cross-attention K/V once.

    With beams > 1 the self-attention caches have batch * beams rows (beam search layout), while
    the encoder runs and the cross-attention keys and values are projected once per source: the
    beams of a source share its cross-attention cache row.
    """
    decoder = variant(model, decode=True, deterministic=True)
    encoded = decoder.apply({"params": params}, inputs, method="encode")
    _, state = decoder.apply(
        {"params": params},
        encoded,
        jnp.zeros((inputs.shape[0] * beams, max_len), jnp.int32),
        inputs=inputs,
        method="decode",
        mutable=["cache"],
    )
    collections = ["cache"] if attention is None else ["cache", "intermediates"]

    def step_fn(tokens, cache):
        logits, new = decoder.apply(
            {"params": params, "cache": cache}, None, tokens, method="decode", mutable=collections
        )
        if attention is None:
            return logits[:, -1], new["cache"]
        return logits[:, -1], new["cache"], _cross_attention(new["intermediates"], attention)

    return step_fn, state["cache"]


def ensemble_step_fn(step_fns: Sequence, mode: str = "log"):
    """One step function over a tuple of caches, whose logits are the models' combined log-probs.

    mode "log": the mean of the models' log-softmax (a geometric mean of their distributions,
    which the decoders renormalise); "prob": the log of the mean of their probabilities. With
    attention, the first model's weights are reported.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble mode {mode!r} is not one of {ENSEMBLE_MODES}.")

    def step_fn(tokens, caches):
        outs = [call_step(f, tokens, c) for f, c in zip(step_fns, caches, strict=True)]
        logp = jnp.stack([jax.nn.log_softmax(o[0].astype(jnp.float32), axis=-1) for o in outs])
        combined = logp.mean(0) if mode == "log" else jax.nn.logsumexp(logp, axis=0) - math.log(len(outs))
        caches = tuple(o[1] for o in outs)
        return (combined, caches) if outs[0][2] is None else (combined, caches, outs[0][2])

    return step_fn


def _as_list(x) -> list:
    return list(x) if isinstance(x, list | tuple) else [x]


def _ensemble(make, models, params, mode: str):
    """(step_fn, cache) of one model, or of an ensemble of several (each with its own params)."""
    models, params = _as_list(models), _as_list(params)
    if len(models) != len(params):
        raise ValueError(f"{len(models)} models but {len(params)} parameter sets.")
    if len(models) == 1:
        return make(models[0], params[0])
    made = [make(m, p) for m, p in zip(models, params, strict=True)]
    return ensemble_step_fn([s for s, _ in made], mode), tuple(c for _, c in made)


def translate(model, params, inputs: jax.Array, max_len: int, **sample_kwargs) -> jax.Array:
    """[B, S] source ids -> [B, max_len] target ids (greedy unless sampling options are given)."""
    step_fn, cache = translation_step_fn(model, params, inputs, max_len)
    first = jnp.full((inputs.shape[0],), PAD_ID, jnp.int32)  # decoding starts from the shifted-in pad
    return sample(step_fn, cache, first, max_len, **sample_kwargs)


def translate_beam(model, params, inputs: jax.Array, max_len: int, *, beams: int = 4, **kwargs) -> jax.Array:
    """[B, S] source ids -> [B, max_len] best beam-search translation per row (see `beam_search`)."""
    return translate_outputs(model, params, inputs, max_len, beams=beams, search="beam", **kwargs)["tokens"][
        :, 0
    ]


def translate_outputs(
    models,
    params,
    inputs: jax.Array,
    max_len: int,
    *,
    beams: int = 1,
    alpha: float = 0.6,
    penalty: str = "gnmt",
    max_lengths: jax.Array | None = None,
    forced: jax.Array | None = None,
    attention: Attention | None = None,
    ensemble_mode: str = "log",
    eos_id: int = EOS_ID,
    search: str | None = None,
    **sample_kwargs,
) -> dict:
    """Translate [B, S] source ids with one model or an ensemble (lists of models and params).

    beams > 1 (or search="beam"): beam search (sampling options are an error); else greedy, or
    sampling with `sample_kwargs` (temperature, top_k, top_p, rng). Returns, hypotheses best first
    (K = beams, 1 for greedy/sampling): "tokens" [B, K, L], "token_logp" [B, K, L], "logp" [B, K]
    (their sum: log P(hypothesis|source)), "scores" [B, K] (logp / length_penalty, as the beam
    ranks), "valid" [B, K], and with `attention` "attention" [B, K, L, A, S]. `forced` [B, L]:
    target prefixes (0 = free), kept verbatim and scored; `max_lengths` [B] caps each output (beam
    search only).
    """

    members = []

    def make(model, p):  # attention is reported from the first member: only it computes it
        members.append(model)
        return translation_step_fn(model, p, inputs, max_len, beams, attention if len(members) == 1 else None)

    step_fn, cache = _ensemble(make, models, params, ensemble_mode)
    B = inputs.shape[0]
    if beams > 1 or search == "beam":
        given = sorted(k for k, v in sample_kwargs.items() if v is not None)
        if given:  # beam search is deterministic: it would decode as if they were not there
            raise ValueError(
                f"sampling options ({', '.join(given)}) with beam search ({beams} beams): beam search "
                "takes none; sample with beams=1, or leave them out"
            )
        out = beam_search_outputs(
            step_fn, cache, B, beams, max_len, alpha=alpha, max_lengths=max_lengths, eos_id=eos_id,
            penalty=penalty, forced=forced,
        )  # fmt: skip
    else:
        first = jnp.full((B,), PAD_ID, jnp.int32)  # decoding starts from the shifted-in pad
        out = sample_outputs(step_fn, cache, first, max_len, eos_id=eos_id, forced=forced, **sample_kwargs)
        out = {k: v[:, None] for k, v in out.items()}
        lengths = jnp.sum(out["tokens"] != PAD_ID, axis=-1).astype(jnp.float32)
        out["scores"] = out["token_logp"].sum(-1) / length_penalty(lengths, alpha, penalty)
        out["valid"] = jnp.ones((B, 1), bool)
    out["logp"] = out["token_logp"].sum(-1)
    return out


def lm_generate(model, params, prompt: jax.Array, max_new: int, **kwargs) -> jax.Array:
    """[B, P] prompt ids (same length) -> [B, max_new] continuation (see `lm_generate_outputs`)."""
    return lm_generate_outputs(model, params, prompt, max_new, **kwargs)["tokens"]


def lm_generate_outputs(
    models,
    params,
    prompt: jax.Array,
    max_new: int,
    *,
    start_id: int | None = PAD_ID,
    ensemble_mode: str = "log",
    **sample_kwargs,
) -> dict:
    """A DecoderOnly's (or an ensemble's) continuation of [B, P] prompts: {"tokens" [B, max_new],
    "token_logp" [B, max_new]} (see `sampling.sample_outputs`).

    Our models are trained on shift_right(tokens), so the prompt is fed behind `start_id` (the
    pad/BOS id 0): prefill [0, p_1 .. p_{P-1}] in one call, then sample token by token from p_P.
    Imported HuggingFace models take the prompt alone (`start_id=None`, P >= 1).
    """
    if start_id is not None:
        prompt = jnp.concatenate([jnp.full((prompt.shape[0], 1), start_id, jnp.int32), prompt], axis=1)
    if prompt.shape[1] == 0:
        raise ValueError("an empty prompt needs a start_id to begin from.")
    step_fn, cache = _ensemble(
        lambda model, p: _lm_step_fn(model, p, prompt, max_new), models, params, ensemble_mode
    )
    return sample_outputs(step_fn, cache, prompt[:, -1], max_new, **sample_kwargs)


def _lm_step_fn(model, params, prompt: jax.Array, max_new: int):
    """(step_fn, cache) of a DecoderOnly with all but the prompt's last token already in the cache."""
    decoder = variant(model, decode=True, deterministic=True)
    B, P = prompt.shape
    _, state = decoder.apply(
        {"params": params}, jnp.zeros((B, P - 1 + max_new), jnp.int32), mutable=["cache"]
    )
    cache = state["cache"]
    if P > 1:
        _, new = decoder.apply({"params": params, "cache": cache}, prompt[:, :-1], mutable=["cache"])
        cache = new["cache"]

    def step_fn(tokens, cache):
        logits, new = decoder.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
        return logits[:, -1], new["cache"]

    return step_fn, cache
