"""Autoregressive decoding over a step function `(tokens [B, 1], cache) -> (logits [B, V], cache)`.

`sample` covers greedy (temperature 0), temperature, top-k and top-p sampling inside one
`jax.lax.while_loop` that stops as soon as every row has produced EOS. `translate` and
`lm_step_fn` build step functions from our models with the KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.layers import (
    cache_path_names,
    resize_self_attention_cache,
    self_attention_cache_slots,
)
from flaxformer_lite.models import variant

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

    def cond(c):
        return (c["i"] < max_len) & ~jnp.all(c["done"])

    def body(c):
        i = c["i"]
        logits, cache = step_fn(c["last"][:, None], c["cache"])
        nxt = choose(logits, jax.random.fold_in(rng, i)).astype(jnp.int32)
        nxt = jnp.where(c["done"], PAD_ID, nxt)
        tokens = jax.lax.dynamic_update_slice(c["tokens"], nxt[:, None], (0, i))
        return dict(i=i + 1, tokens=tokens, last=nxt, done=c["done"] | (nxt == eos_id), cache=cache)

    init = dict(
        i=jnp.int32(0),
        tokens=jnp.full((B, max_len), PAD_ID, jnp.int32),
        last=first_tokens.astype(jnp.int32),
        done=jnp.zeros((B,), bool),
        cache=cache,
    )
    return _while_in_stages(cond, body, init, max_len)["tokens"]


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


def strip_after_eos(ids) -> list[list[int]]:
    """Host-side: each row's ids before the first EOS (and without padding)."""
    out = []
    for row in jax.device_get(ids).tolist():
        row = row[: row.index(EOS_ID)] if EOS_ID in row else row
        out.append([t for t in row if t != PAD_ID])
    return out


def check_options(
    *, beam_size=4, alpha=0.6, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=64, length_penalty="gnmt"
):
    """Raise a ValueError naming the first bad decoding option (as its command-line flag)."""
    for ok, what in (
        (
            length_penalty in LENGTH_PENALTIES,
            f"--length_penalty={length_penalty} must be one of {LENGTH_PENALTIES}",
        ),
        (beam_size >= 1, f"--beam_size={beam_size} must be at least 1 (1 = greedy)"),
        (alpha >= 0, f"--alpha={alpha} must be >= 0"),
        (temperature >= 0, f"--temperature={temperature} must be >= 0 (0 = greedy)"),
        (top_k >= 0, f"--top_k={top_k} must be >= 0 (0 = all tokens)"),
        (0 < top_p <= 1, f"--top_p={top_p} must be in (0, 1]"),
        (max_new_tokens >= 1, f"--max_new_tokens={max_new_tokens} must be at least 1"),
    ):
        if not ok:
            raise ValueError(what)


# ------------------------------------------------------------------------------ beam search

NEG_INF = -1.0e7


LENGTH_PENALTIES = ("gnmt", "hf")


def length_penalty(length, alpha: float, kind: str = "gnmt"):
    """What a finished hypothesis's log P is divided by, for `length` tokens (EOS included).

    "gnmt": ((5 + length) / 6) ** alpha (Wu et al. 2016); "hf": length ** alpha (transformers'
    `length_penalty`, where alpha 1.0 is its default).
    """
    return ((5.0 + length) / 6.0) ** alpha if kind == "gnmt" else length**alpha


def _gather_beams(tree, beam_indices, batch: int, beams: int):
    """Reorder the self-attention cache rows (batch * beams on axis 0, or 1 under nn.scan).

    Cross-attention caches hold one row per source, shared by its beams (see
    `translation_step_fn`), so they are never reordered.
    """
    flat = (jnp.arange(batch)[:, None] * beams + beam_indices).reshape(-1)  # [B*K] source rows

    def gather(path, x):
        names = cache_path_names(path)
        if "cross_attention" in names:
            return x
        axis = 1 if "layers" in names else 0  # run_layers names the scanned stack "layers"
        if x.ndim <= axis or x.shape[axis] != batch * beams:
            return x  # the cache index
        return jnp.take(x, flat, axis=axis)

    return jax.tree_util.tree_map_with_path(gather, tree)


def beam_search(
    step_fn,
    cache,
    batch: int,
    beams: int,
    max_len: int,
    *,
    alpha: float = 0.6,
    max_lengths: jax.Array | None = None,
    eos_id: int = EOS_ID,
    start_id: int = PAD_ID,
    penalty: str = "gnmt",
) -> tuple[jax.Array, jax.Array]:
    """Beam search with a length penalty: -> ([B, beams, max_len] ids, [B, beams] scores).

    Each self-attention cache in `cache` holds batch * beams rows, beams of a source adjacent
    (see `translation_step_fn`). A hypothesis ends at EOS and scores
    log P / length_penalty(length incl. EOS, alpha, penalty). Returns beams sorted best first.

    penalty "gnmt" (Flax example, T2T): any of the 2K candidates may end; `max_lengths` [B] forces
    EOS at a per-example length (e.g. relative to the source); a row stops once no live beam can
    beat its worst finished one (an exact bound).
    penalty "hf" reproduces transformers' `generate(num_beams=K, early_stopping=False)`: only the
    top K candidates may end; at the length limit the live beams end without EOS; a row stops
    (and takes no more hypotheses) once all K slots are finished and the best live beam, penalised
    at its current length, does not beat the worst of them (a heuristic).
    """
    if penalty not in LENGTH_PENALTIES:
        raise ValueError(f"length penalty {penalty!r} is not one of {LENGTH_PENALTIES}.")
    hf = penalty == "hf"
    limit = jnp.full((batch,), max_len) if max_lengths is None else jnp.minimum(max_lengths, max_len)
    seqs0 = jnp.full((batch, beams, max_len), PAD_ID, jnp.int32)
    live_logp0 = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1)), (batch, 1))  # one live beam to start
    init = dict(
        i=jnp.int32(0),
        cache=cache,
        live=seqs0,
        live_logp=live_logp0,
        last=jnp.full((batch, beams), start_id, jnp.int32),
        fin=seqs0,
        fin_score=jnp.full((batch, beams), NEG_INF),
        fin_any=jnp.zeros((batch,), bool),
        done=jnp.zeros((batch,), bool),
    )

    def cond(s):
        if hf:
            return (s["i"] < max_len) & ~jnp.all(s["done"])
        best_live = s["live_logp"][:, 0] / length_penalty(limit.astype(jnp.float32), alpha)
        worst_fin = jnp.where(s["fin_any"], jnp.min(s["fin_score"], axis=1), NEG_INF)
        # Scores only fall as hypotheses grow (log P <= 0), so the best a live beam can reach is bounded.
        can_improve = ~s["fin_any"] | (best_live > worst_fin)
        return (s["i"] < max_len) & jnp.any(can_improve)

    def body(s):
        i = s["i"]
        logits, cache = step_fn(s["last"].reshape(-1, 1), s["cache"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beams, -1)  # [B, K, V]
        V = logp.shape[-1]
        at_limit = (i + 1 >= limit)[:, None, None]
        if not hf:
            not_eos = (jnp.arange(V) != eos_id)[None, None, :]
            logp = jnp.where(at_limit & not_eos, NEG_INF, logp)  # force EOS at the limit
        cand = (s["live_logp"][:, :, None] + logp).reshape(batch, beams * V)
        top_logp, top_idx = jax.lax.top_k(cand, 2 * beams)  # 2K: enough to keep K non-EOS
        beam_idx, token = top_idx // V, (top_idx % V).astype(jnp.int32)
        seqs = jnp.take_along_axis(s["live"], beam_idx[:, :, None], axis=1)
        seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, i))  # [B, 2K, L]
        is_eos = token == eos_id
        ends = is_eos
        if hf:  # the top K may end, by EOS or at the limit; a row that is done takes no more
            ends = (is_eos | at_limit[:, :, 0]) & (jnp.arange(2 * beams) < beams)[None, :]
            ends = ends & ~s["done"][:, None]
        # Finished: merge ended candidates into the finished set, keep the best K by penalised score.
        new_score = jnp.where(ends, top_logp / length_penalty(i + 1.0, alpha, penalty), NEG_INF)
        all_score = jnp.concatenate([s["fin_score"], new_score], axis=1)
        all_seqs = jnp.concatenate([s["fin"], seqs], axis=1)
        fin_score, keep = jax.lax.top_k(all_score, beams)
        fin = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
        # Live: the best K candidates that did not end.
        live_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), beams)
        live = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
        last = jnp.take_along_axis(token, keep, axis=1)
        cache = _gather_beams(cache, jnp.take_along_axis(beam_idx, keep, axis=1), batch, beams)
        done = s["done"]
        if hf:  # transformers' early_stopping=False heuristic, sticky per row
            best_live = live_logp[:, 0] / length_penalty(i + 1.0, alpha, penalty)
            full = jnp.all(fin_score > NEG_INF / 2, axis=1)
            done = done | (full & (best_live <= jnp.min(fin_score, axis=1))) | (i + 1 >= limit)
        return dict(
            i=i + 1,
            cache=cache,
            live=live,
            live_logp=live_logp,
            last=last,
            fin=fin,
            fin_score=fin_score,
            fin_any=s["fin_any"] | jnp.any(ends, axis=1),
            done=done,
        )

    s = _while_in_stages(cond, body, init, max_len)
    # Rows that never finished fall back to their live beams (scored with the same penalty).
    live_score = s["live_logp"] / length_penalty(jnp.float32(max_len), alpha, penalty)
    seqs = jnp.where(s["fin_any"][:, None, None], s["fin"], s["live"])
    scores = jnp.where(s["fin_any"][:, None], s["fin_score"], live_score)
    return seqs, scores


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
