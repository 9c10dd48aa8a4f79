"""Autoregressive decoding over a step function `(tokens [B, 1], cache) -> (logits [B, V], cache)`.

`sample` covers greedy (temperature 0), temperature, top-k and top-p sampling inside one
`jax.lax.while_loop` that stops as soon as every row has produced EOS. `translate` and
`lm_step_fn` build step functions from our models with the KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxformer_lite.tokenizer import EOS_ID, PAD_ID


def _filter_logits(logits, top_k: int, top_p: float):
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p."""
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus (the first sorted one always is).
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample(
    step_fn,
    cache,
    first_tokens: jax.Array,
    max_len: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = EOS_ID,
) -> jax.Array:
    """[B] first input tokens -> [B, max_len] generated ids (EOS included, then PAD)."""
    B = first_tokens.shape[0]
    rng = jax.random.key(0) if rng is None else rng

    def choose(logits, key):
        logits = logits.astype(jnp.float32)
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1)
        logits = _filter_logits(logits / temperature, top_k, top_p)
        return jax.random.categorical(key, logits, axis=-1)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_len) & ~jnp.all(done)

    def body(carry):
        i, tokens, cur, done, cache = carry
        logits, cache = step_fn(cur[:, None], cache)
        nxt = choose(logits, jax.random.fold_in(rng, i)).astype(jnp.int32)
        nxt = jnp.where(done, PAD_ID, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
        return i + 1, tokens, nxt, done | (nxt == eos_id), cache

    init = (
        jnp.int32(0),
        jnp.full((B, max_len), PAD_ID, jnp.int32),
        first_tokens.astype(jnp.int32),
        jnp.zeros((B,), bool),
        cache,
    )
    return jax.lax.while_loop(cond, body, init)[1]


def translation_step_fn(model, params, inputs: jax.Array, max_len: int):
    """(step_fn, cache) for an EncoderDecoder: encode once, cache cross-attention K/V once."""
    decoder = model.clone(config=model.config.replace(decode=True, deterministic=True))
    encoded = decoder.apply({"params": params}, inputs, method="encode")
    target_shape = (inputs.shape[0], max_len)
    _, state = decoder.apply(
        {"params": params},
        encoded,
        jnp.zeros(target_shape, jnp.int32),
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


def strip_after_eos(ids) -> list[list[int]]:
    """Host-side: each row's ids before the first EOS (and without padding)."""
    out = []
    for row in jax.device_get(ids).tolist():
        row = row[: row.index(EOS_ID)] if EOS_ID in row else row
        out.append([t for t in row if t != PAD_ID])
    return out
