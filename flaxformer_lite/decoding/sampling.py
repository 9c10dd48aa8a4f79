"""Greedy and sampled decoding over a step function `(tokens [B, 1], cache) -> (logits [B, V], cache)`.

`sample` covers greedy (temperature 0), temperature, top-k and top-p sampling inside one
`jax.lax.while_loop` that stops as soon as every row has produced EOS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.model.attention import resize_self_attention_cache, self_attention_cache_slots

NEG_INF = -1.0e7  # a log-prob no hypothesis can reach (finite: sums of it stay comparable)
STAGED_STEPS = 32  # decoding loops at least this long grow their self-attention cache in stages


def _while_in_stages(cond, body, carry: dict, steps: int) -> dict:
    """`jax.lax.while_loop(cond, body, carry)` for at most `steps` steps (carry["i"] counts them).

    Loops of `STAGED_STEPS` or more run in three stages (to 1/4, 1/2 and all of the steps), each
    over a self-attention cache cut to the slots it can have written (any prompt's, then the
    steps'). Attention and the beam reorder then read about 30% fewer cached keys and values
    over the loop, at the price of compiling the body three times.
    """
    slots = self_attention_cache_slots(carry["cache"])
    if slots is None or steps < STAGED_STEPS or slots < steps:  # slots < steps: a caller's short cache, as is
        return jax.lax.while_loop(cond, body, carry)
    prompt = slots - steps  # slots written before the loop
    for end in (steps // 4, steps // 2, steps):
        carry = {**carry, "cache": resize_self_attention_cache(carry["cache"], prompt + end)}
        carry = jax.lax.while_loop(lambda c, end=end: cond(c) & (c["i"] < end), body, carry)
    return carry


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


def call_step(step_fn, tokens, cache):
    """(logits, cache, attention or None): a step function may also return its attention weights
    ([rows, A, S]: A kept layers (or one), source positions S; see `steps.translation_step_fn`)."""
    out = step_fn(tokens, cache)
    return out if len(out) == 3 else (*out, None)


def force(logp, forced):
    """Log-probs [B, ..., V] with every token but `forced` [B] (> 0) pushed to NEG_INF; rows with
    forced 0 are free. The forced token keeps its real log-prob, so it is scored, not generated."""
    V = logp.shape[-1]
    keep = (forced[:, None] == jnp.arange(V)[None, :]) | (forced[:, None] <= 0)
    keep = keep.reshape(keep.shape[:1] + (1,) * (logp.ndim - 2) + keep.shape[1:])
    return jnp.where(keep, logp, NEG_INF)


def pad_forced(forced, max_len: int):
    """[B, P] forced ids (0 = free) padded with 0 to [B, max_len] (a prefix shorter than the loop)."""
    if forced is None:
        return None
    if forced.shape[1] > max_len:
        raise ValueError(f"a forced prefix of {forced.shape[1]} positions is longer than max_len={max_len}.")
    return jnp.pad(forced, ((0, 0), (0, max_len - forced.shape[1])))


def sample(step_fn, cache, first_tokens: jax.Array, max_len: int, **kwargs) -> jax.Array:
    """[B] first input tokens -> [B, max_len] generated ids (EOS included, then PAD).

    Greedy with temperature 0 (the default), else sampled; see `sample_outputs`.
    """
    return sample_outputs(step_fn, cache, first_tokens, max_len, **kwargs)["tokens"]


def sample_outputs(
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
    forced: jax.Array | None = None,
) -> dict:
    """Greedy or sampled decoding -> {"tokens": [B, L] ids (EOS, then PAD), "token_logp": [B, L],
    and with an attention-returning step function "attention": [B, L, A, S]}.

    token_logp is each chosen token's log-probability under the model (log-softmax of the logits,
    before temperature and filtering); 0 after EOS. `forced` [B, L] ids (0 = free) are emitted
    verbatim at their steps and scored: a target prefix to continue.
    """
    rng = jax.random.key(0) if rng is None else rng
    forced = pad_forced(forced, max_len)

    choose = functools.partial(_choose, temperature=temperature, top_k=top_k, top_p=top_p)

    def cond(c):
        return (c["i"] < max_len) & ~jnp.all(c["done"])

    def body(c):
        i = c["i"]
        logits, cache, attn = call_step(step_fn, c["last"][:, None], c["cache"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nxt = choose(logits.astype(jnp.float32), jax.random.fold_in(rng, i)).astype(jnp.int32)
        if forced is not None:
            f = jax.lax.dynamic_index_in_dim(forced, i, axis=1, keepdims=False)
            nxt = jnp.where(f > 0, f, nxt)
        nxt = jnp.where(c["done"], PAD_ID, nxt)
        step_logp = jnp.where(c["done"], 0.0, jnp.take_along_axis(logp, nxt[:, None], axis=1)[:, 0])
        out = dict(c, i=i + 1, last=nxt, done=c["done"] | (nxt == eos_id), cache=cache)
        out["tokens"] = jax.lax.dynamic_update_slice(c["tokens"], nxt[:, None], (0, i))
        out["token_logp"] = jax.lax.dynamic_update_slice(c["token_logp"], step_logp[:, None], (0, i))
        if attn is not None:
            out["attention"] = jax.lax.dynamic_update_slice_in_dim(c["attention"], attn[:, None], i, axis=1)
        return out

    out = _while_in_stages(cond, body, _initial_carry(step_fn, cache, first_tokens, max_len), max_len)
    return {k: out[k] for k in ("tokens", "token_logp", "attention") if k in out}


def _choose(logits, key, *, temperature: float, top_k: int, top_p: float):
    """[B, V] logits -> [B] next tokens: the argmax at temperature 0, else a filtered sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = _filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1)


def _initial_carry(step_fn, cache, first_tokens, max_len: int) -> dict:
    """The decoding loop's carry: empty outputs (attention tracks if the step function gives them)."""
    B = first_tokens.shape[0]
    init = dict(
        i=jnp.int32(0),
        tokens=jnp.full((B, max_len), PAD_ID, jnp.int32),
        token_logp=jnp.zeros((B, max_len), jnp.float32),
        last=first_tokens.astype(jnp.int32),
        done=jnp.zeros((B,), bool),
        cache=cache,
    )
    attn_shape = jax.eval_shape(lambda: call_step(step_fn, init["last"][:, None], cache)[2])
    if attn_shape is not None:
        init["attention"] = jnp.zeros((B, max_len) + attn_shape.shape[1:], jnp.float32)
    return init


def strip_after_eos(ids) -> list[list[int]]:
    """Host-side: each row's ids before the first EOS (and without padding)."""
    out = []
    for row in jax.device_get(ids).tolist():
        row = row[: row.index(EOS_ID)] if EOS_ID in row else row
        out.append([t for t in row if t != PAD_ID])
    return out
