"""Beam-search self-attention caches: reorder per step (ours) against parent pointers.

    python -m benchmarks.beam_cache --rounds=3

Both run `steps` decoding steps of `layers` self-attention layers over random queries, keys and
values and random beam parents, in one `lax.fori_loop`, and must give the same attention outputs.
"reorder" is what `decoding.beam_search` does: per-row caches (keys [B*G, N, H, S], values
[B*G, N, S, H]) gathered by parent after every step. "pointers" never moves a cache: rows keep
what they wrote, keys [B, N, H, G, S], and each beam attends over all G rows of its source with
a mask from its ancestry ([B, G, S]: the row that holds its token at each slot), so one
[G, H] x [H, G*S] product per head replaces G matvecs and the gathers. Calls alternate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import report, time_fn

flags.DEFINE_integer("batch", 8, "Sources B.")
flags.DEFINE_integer("beams", 4, "Beams G per source.")
flags.DEFINE_integer("heads", 8, "Heads N.")
flags.DEFINE_integer("head_dim", 64, "Head size H.")
flags.DEFINE_integer("steps", 64, "Decoding steps = cache slots S.")
flags.DEFINE_integer("layers", 6, "Decoder layers.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
FLAGS = flags.FLAGS
NEG = jnp.finfo(jnp.float32).min


def make_fns(B, G, N, H, S, L):
    r = np.random.default_rng(0)
    q_all = jnp.asarray(r.standard_normal((S, L, B * G, N, H), np.float32))
    kv_all = jnp.asarray(r.standard_normal((S, L, B * G, N, H), np.float32))
    parents = jnp.asarray(r.integers(0, G, (S, B, G)))

    def reorder():
        def step(i, carry):
            ks, vs, acc = carry
            rows = (jnp.arange(B)[:, None] * G + parents[i]).reshape(-1)
            new_ks, new_vs = [], []
            for layer in range(L):
                k = jax.lax.dynamic_update_slice(ks[layer], kv_all[i, layer][..., None], (0, 0, 0, i))
                v = jax.lax.dynamic_update_slice(vs[layer], kv_all[i, layer][:, :, None], (0, 0, i, 0))
                logits = jnp.where(jnp.arange(S) <= i, jnp.einsum("bnh,bnhs->bns", q_all[i, layer], k), NEG)
                acc = acc + jnp.einsum("bns,bnsh->bnh", jax.nn.softmax(logits), v)
                new_ks.append(k[rows])
                new_vs.append(v[rows])
            return new_ks, new_vs, acc

        ks = [jnp.zeros((B * G, N, H, S))] * L
        vs = [jnp.zeros((B * G, N, S, H))] * L
        return jax.lax.fori_loop(0, S, step, (ks, vs, jnp.zeros((B * G, N, H))))[2]

    def pointers():
        def step(i, carry):
            ks, vs, ancestry, acc = carry
            ancestry = ancestry.at[:, :, i].set(jnp.arange(G)[None])  # row g writes slot i for beam g
            mask = (ancestry[:, :, None, :] == jnp.arange(G)[None, None, :, None]) & (jnp.arange(S) <= i)
            mask = mask.reshape(B, 1, G, G * S)
            new_ks, new_vs = [], []
            for layer in range(L):
                new = kv_all[i, layer].reshape(B, G, N, H)
                k = jax.lax.dynamic_update_slice(
                    ks[layer], jnp.transpose(new, (0, 2, 3, 1))[..., None], (0, 0, 0, 0, i)
                )  # [B, N, H, G, S]
                v = jax.lax.dynamic_update_slice(
                    vs[layer], jnp.transpose(new, (0, 2, 1, 3))[:, :, :, None], (0, 0, 0, i, 0)
                )  # [B, N, G, S, H]
                q = jnp.transpose(q_all[i, layer].reshape(B, G, N, H), (0, 2, 1, 3))
                logits = jnp.einsum("bngh,bnhs->bngs", q, k.reshape(B, N, H, G * S))
                probs = jax.nn.softmax(jnp.where(mask, logits, NEG))
                out = jnp.einsum("bngs,bnsh->bngh", probs, v.reshape(B, N, G * S, H))
                acc = acc + jnp.transpose(out, (0, 2, 1, 3)).reshape(B * G, N, H)
                new_ks.append(k)
                new_vs.append(v)
            ancestry = jnp.take_along_axis(ancestry, parents[i][:, :, None], axis=1)  # the parent's
            return new_ks, new_vs, ancestry, acc

        ks = [jnp.zeros((B, N, H, G, S))] * L
        vs = [jnp.zeros((B, N, G, S, H))] * L
        ancestry = jnp.broadcast_to(jnp.arange(G)[None, :, None], (B, G, S))
        return jax.lax.fori_loop(0, S, step, (ks, vs, ancestry, jnp.zeros((B * G, N, H))))[3]

    return jax.jit(reorder), jax.jit(pointers)


def main(argv):
    del argv
    shape = (FLAGS.batch, FLAGS.beams, FLAGS.heads, FLAGS.head_dim, FLAGS.steps, FLAGS.layers)
    reorder, pointers = make_fns(*shape)
    np.testing.assert_allclose(reorder(), pointers(), rtol=2e-3, atol=2e-3)  # the same attention
    ms = {"reorder": [], "pointers": []}
    for _ in range(FLAGS.rounds):
        for name, fn in (("reorder", reorder), ("pointers", pointers)):
            ms[name].append(round(time_fn(fn, iters=3) * 1e3, 1))
    report(
        "beam_cache",
        batch=FLAGS.batch, beams=FLAGS.beams, heads=FLAGS.heads, head_dim=FLAGS.head_dim,
        steps=FLAGS.steps, layers=FLAGS.layers, ms_per_loop=ms,
        pointers_over_reorder=round(float(np.median(ms["pointers"]) / np.median(ms["reorder"])), 2),
    )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
