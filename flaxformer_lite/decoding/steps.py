"""Step functions of our models with the KV cache, and the decoders built on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxformer_lite.decoding.beam import beam_search
from flaxformer_lite.decoding.sampling import sample
from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.models import variant


def translation_step_fn(model, params, inputs: jax.Array, max_len: int, beams: int = 1):
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

    def step_fn(tokens, cache):
        logits, new = decoder.apply(
            {"params": params, "cache": cache}, None, tokens, method="decode", mutable=["cache"]
        )
        return logits[:, -1], new["cache"]

    return step_fn, state["cache"]


def translate(model, params, inputs: jax.Array, max_len: int, **sample_kwargs) -> jax.Array:
    """[B, S] source ids -> [B, max_len] target ids (greedy unless sampling options are given)."""
    step_fn, cache = translation_step_fn(model, params, inputs, max_len)
    first = jnp.full((inputs.shape[0],), PAD_ID, jnp.int32)  # decoding starts from the shifted-in pad
    return sample(step_fn, cache, first, max_len, **sample_kwargs)


def translate_beam(
    model,
    params,
    inputs: jax.Array,
    max_len: int,
    *,
    beams: int = 4,
    alpha: float = 0.6,
    max_lengths: jax.Array | None = None,
    eos_id: int = EOS_ID,
    penalty: str = "gnmt",
) -> jax.Array:
    """[B, S] source ids -> [B, max_len] best beam-search translation per row (see `beam_search`)."""
    step_fn, cache = translation_step_fn(model, params, inputs, max_len, beams)
    seqs, _ = beam_search(
        step_fn, cache, inputs.shape[0], beams, max_len, alpha=alpha, max_lengths=max_lengths, eos_id=eos_id,
        penalty=penalty,
    )  # fmt: skip
    return seqs[:, 0]


def lm_generate(
    model, params, prompt: jax.Array, max_new: int, *, start_id: int | None = PAD_ID, **sample_kwargs
) -> jax.Array:
    """[B, P] prompt ids (same length) -> [B, max_new] continuation from a DecoderOnly.

    Our models are trained on shift_right(tokens), so the prompt is fed behind `start_id` (the
    pad/BOS id 0): prefill [0, p_1 .. p_{P-1}] in one call, then sample token by token from p_P.
    Imported HuggingFace models take the prompt alone (`start_id=None`, P >= 1).
    """
    decoder = variant(model, decode=True, deterministic=True)
    if start_id is not None:
        prompt = jnp.concatenate([jnp.full((prompt.shape[0], 1), start_id, jnp.int32), prompt], axis=1)
    B, P = prompt.shape
    if P == 0:
        raise ValueError("an empty prompt needs a start_id to begin from.")
    _, state = decoder.apply(
        {"params": params}, jnp.zeros((B, P - 1 + max_new), jnp.int32), mutable=["cache"]
    )
    cache, first = state["cache"], prompt[:, -1]
    if P > 1:
        _, new = decoder.apply({"params": params, "cache": cache}, prompt[:, :-1], mutable=["cache"])
        cache = new["cache"]

    def step_fn(tokens, cache):
        logits, new = decoder.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
        return logits[:, -1], new["cache"]

    return sample(step_fn, cache, first, max_new, **sample_kwargs)
