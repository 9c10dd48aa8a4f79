"""Beam search with a length penalty over a step function (see `sampling` for its contract)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxformer_lite.decoding.sampling import _while_in_stages
from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.layers import cache_path_names

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
