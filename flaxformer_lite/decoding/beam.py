"""Beam search with a length penalty over a step function (see `sampling` for its contract)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxformer_lite.decoding.sampling import NEG_INF, _while_in_stages, call_step, force, pad_forced
from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.model.attention import cache_path_names

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
    step_fn, cache, batch: int, beams: int, max_len: int, **kwargs
) -> tuple[jax.Array, jax.Array]:
    """Beam search with a length penalty: -> ([B, beams, max_len] ids, [B, beams] scores).

    Returns beams sorted best first; see `beam_search_outputs` for the options and rules.
    """
    out = beam_search_outputs(step_fn, cache, batch, beams, max_len, **kwargs)
    return out["tokens"], out["scores"]


def beam_search_outputs(
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
    forced: jax.Array | None = None,
) -> dict:
    """Beam search -> {"tokens": [B, K, L] ids, "scores": [B, K] penalised scores, "token_logp":
    [B, K, L] each token's log-prob (0 after EOS), "valid": [B, K] (False: an empty slot), and
    "attention": [B, K, L, A, S] with an attention-returning step function}, best first.

    Each self-attention cache in `cache` holds batch * beams rows, beams of a source adjacent
    (see `translation_step_fn`). A hypothesis ends at EOS and scores
    log P / length_penalty(length incl. EOS, alpha, penalty).

    penalty "gnmt" (Flax example, T2T): any of the 2K candidates may end; `max_lengths` [B] forces
    EOS at a per-example length (e.g. relative to the source); a row stops once no live beam can
    beat its worst finished one (an exact bound).
    penalty "hf" reproduces transformers' `generate(num_beams=K, early_stopping=False)`: only the
    top K candidates may end; at the length limit the live beams end without EOS; a row stops
    (and takes no more hypotheses) once all K slots are finished and the best live beam, penalised
    at its current length, does not beat the worst of them (a heuristic).
    `forced` [B, L] ids (0 = free) are taken verbatim at their steps and scored (a target prefix):
    only one beam lives through a row's prefix, and the search widens after it.
    """
    if penalty not in LENGTH_PENALTIES:
        raise ValueError(f"length penalty {penalty!r} is not one of {LENGTH_PENALTIES}.")
    hf = penalty == "hf"
    limit = jnp.full((batch,), max_len) if max_lengths is None else jnp.minimum(max_lengths, max_len)
    forced = pad_forced(forced, max_len)
    init = _initial_state(step_fn, cache, batch, beams, max_len, start_id)
    lp = lambda length: length_penalty(length, alpha, penalty)  # noqa: E731

    cond = functools.partial(_searching, hf=hf, limit=limit, alpha=alpha, max_len=max_len)

    def body(s):
        i = s["i"]
        logits, cache, attn = call_step(step_fn, s["last"].reshape(-1, 1), s["cache"])
        raw = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beams, -1)  # [B, K, V]
        at_limit = (i + 1 >= limit)[:, None, None]
        logp = raw if hf else _eos_at_limit(raw, at_limit, eos_id)
        if forced is not None:
            logp = force(logp, jax.lax.dynamic_index_in_dim(forced, i, axis=1, keepdims=False))
        top_logp, beam_idx, token, tracks = _expand(s, raw, logp, attn, i, beams)
        is_eos = token == eos_id
        ends = is_eos & (top_logp > NEG_INF / 2)  # a forced-away candidate never finishes
        if hf:  # the top K may end, by EOS or at the limit; a row that is done takes no more
            ends = (is_eos | at_limit[:, :, 0]) & (jnp.arange(2 * beams) < beams)[None, :]
            ends = ends & ~s["done"][:, None] & (top_logp > NEG_INF / 2)
        # Finished: merge ended candidates into the finished set, keep the best K by penalised score.
        new_score = jnp.where(ends, top_logp / lp(i + 1.0), NEG_INF)
        fin_score, keep = jax.lax.top_k(jnp.concatenate([s["fin_score"], new_score], axis=1), beams)
        fin = {k: _take(jnp.concatenate([s["fin"][k], v], axis=1), keep) for k, v in tracks.items()}
        # Live: the best K candidates that did not end.
        live_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), beams)
        cache = _gather_beams(cache, jnp.take_along_axis(beam_idx, keep, axis=1), batch, beams)
        done = s["done"]
        if hf:  # transformers' early_stopping=False heuristic, sticky per row
            best_live = live_logp[:, 0] / lp(i + 1.0)
            full = jnp.all(fin_score > NEG_INF / 2, axis=1)
            done = done | (full & (best_live <= jnp.min(fin_score, axis=1))) | (i + 1 >= limit)
        return dict(
            i=i + 1, cache=cache, live={k: _take(v, keep) for k, v in tracks.items()}, live_logp=live_logp,
            last=jnp.take_along_axis(token, keep, axis=1), fin=fin, fin_score=fin_score,
            fin_any=s["fin_any"] | jnp.any(ends, axis=1), done=done,
        )  # fmt: skip

    return _results(_while_in_stages(cond, body, init, max_len), lp(jnp.float32(max_len)))


def _searching(s, *, hf: bool, limit, alpha: float, max_len: int):
    """The search's loop condition: a row goes on while a live beam can still beat its finished ones."""
    if hf:
        return (s["i"] < max_len) & ~jnp.all(s["done"])
    best_live = s["live_logp"][:, 0] / length_penalty(limit.astype(jnp.float32), alpha)
    worst_fin = jnp.where(s["fin_any"], jnp.min(s["fin_score"], axis=1), NEG_INF)
    # Scores only fall as hypotheses grow (log P <= 0), so the best a live beam can reach is bounded.
    can_improve = ~s["fin_any"] | (best_live > worst_fin)
    return (s["i"] < max_len) & jnp.any(can_improve)


def _eos_at_limit(logp, at_limit, eos_id: int):
    """[B, K, V] log-probs with every token but EOS ruled out where a row reaches its length limit."""
    not_eos = (jnp.arange(logp.shape[-1]) != eos_id)[None, None, :]
    return jnp.where(at_limit & not_eos, NEG_INF, logp)


def _results(s, final_penalty) -> dict:
    """The finished hypotheses of the final carry; rows that never finished fall back to their live
    beams, scored with the length penalty at the full length (`final_penalty`)."""
    live_score = s["live_logp"] / final_penalty
    fin_any = s["fin_any"][:, None]
    out = {k: jnp.where(fin_any.reshape(fin_any.shape + (1,) * (v.ndim - 2)), v, s["live"][k])
           for k, v in s["fin"].items()}  # fmt: skip
    out["scores"] = jnp.where(fin_any, s["fin_score"], live_score)
    # Judged before the length penalty: a junk beam's NEG_INF / penalty would pass for a score.
    out["valid"] = jnp.where(fin_any, s["fin_score"], s["live_logp"]) > NEG_INF / 2
    out["token_logp"] = jnp.where(out["tokens"] == PAD_ID, 0.0, out["token_logp"])
    return out


def _initial_state(step_fn, cache, batch: int, beams: int, max_len: int, start_id: int) -> dict:
    """The search's carry: one live beam per row to start, no finished hypothesis.

    Each hypothesis carries "tracks" of per-step values: its tokens, their log-probs and, when the
    step function returns attention weights, its attention ([A, S] per step).
    """
    last = jnp.full((batch, beams), start_id, jnp.int32)
    tracks = dict(
        tokens=jnp.full((batch, beams, max_len), PAD_ID, jnp.int32),
        token_logp=jnp.zeros((batch, beams, max_len), jnp.float32),
    )
    attn = jax.eval_shape(lambda: call_step(step_fn, last.reshape(-1, 1), cache)[2])
    if attn is not None:
        tracks["attention"] = jnp.zeros((batch, beams, max_len) + attn.shape[1:], jnp.float32)
    return dict(
        i=jnp.int32(0),
        cache=cache,
        live=tracks,
        live_logp=jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1)), (batch, 1)),
        last=last,
        fin=tracks,
        fin_score=jnp.full((batch, beams), NEG_INF),
        fin_any=jnp.zeros((batch,), bool),
        done=jnp.zeros((batch,), bool),
    )


def _expand(s, raw, logp, attn, i, beams: int):
    """The 2K best one-token extensions of the live beams: (their log P [B, 2K], parent beam,
    token, and their tracks [B, 2K, L, ...] with step i written). 2K: enough to keep K non-EOS."""
    batch, _, V = logp.shape
    cand = (s["live_logp"][:, :, None] + logp).reshape(batch, beams * V)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * beams)
    beam_idx, token = top_idx // V, (top_idx % V).astype(jnp.int32)
    step = dict(tokens=token, token_logp=jnp.take_along_axis(raw.reshape(batch, -1), top_idx, axis=1))
    if attn is not None:
        step["attention"] = _take(attn.reshape((batch, beams) + attn.shape[1:]).astype(jnp.float32), beam_idx)
    tracks = {}
    for k, v in s["live"].items():
        parent = _take(v, beam_idx)  # [B, 2K, L, ...]
        tracks[k] = jax.lax.dynamic_update_slice_in_dim(parent, step[k][:, :, None], i, axis=2)
    return top_logp, beam_idx, token, tracks


def _take(x, idx):
    """x [B, K, ...] rows picked per batch row by idx [B, J] -> [B, J, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


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
