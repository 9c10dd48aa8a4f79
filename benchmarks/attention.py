"""Our attention op against the bare `jax.nn.dot_product_attention` kernel, forward and fwd+bwd.

    python -m benchmarks.attention --lengths=512,1024,2048,4096,8192,16384

Causal self-attention, bf16, [B, T, N, H] with B*T fixed (tokens per call constant). On GPU the
bare kernel is cuDNN flash attention; on CPU only XLA exists. With --packed, ours also gets segment
ids (two sequences per row), which the bare causal kernel does not have to handle: on a Hopper GPU
that is cuDNN's packed layout (sized by --max_segments), elsewhere the XLA path with a dense mask.
--impl forces ours onto one path (e.g. xla, to compare packed cuDNN against it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import report, time_fn
from flaxformer_lite import ops

flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096"], "Sequence lengths T.")
flags.DEFINE_integer("tokens", 32_768, "B * T per call.")
flags.DEFINE_integer("heads", 16, "Heads N.")
flags.DEFINE_integer("head_dim", 64, "Head size H.")
flags.DEFINE_bool("packed", False, "Give ours segment ids (two sequences per row).")
flags.DEFINE_integer("max_segments", 32, "Most sequences per row (ModelConfig.max_segments).")
flags.DEFINE_string("impl", None, "Force our op's implementation (xla, cudnn, splash); default: choose.")
flags.DEFINE_integer("iters", 10, "Timed calls.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    on_gpu = jax.default_backend() == "gpu"
    bare_impl = "cudnn" if on_gpu else "xla"
    for T in map(int, FLAGS.lengths):
        B = max(FLAGS.tokens // T, 1)
        shape = (B, T, FLAGS.heads, FLAGS.head_dim)
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        seg = jnp.where(jnp.arange(T) < T // 2, 1, 2)[None].repeat(B, 0) if FLAGS.packed else None

        def ours(q, k, v, seg=seg):
            return ops.dot_product_attention(
                q, k, v, is_causal=True, segment_ids=seg, max_segments=FLAGS.max_segments,
                implementation=FLAGS.impl,
            )  # fmt: skip

        def bare(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=bare_impl)

        row = {}
        for name, fn in (("ours", ours), ("bare", bare)):
            fwd = jax.jit(fn)
            bwd = jax.jit(
                jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
            )
            row[f"{name}_fwd_ms"] = round(time_fn(fwd, q, k, v, iters=FLAGS.iters) * 1e3, 3)
            row[f"{name}_fwd_bwd_ms"] = round(time_fn(bwd, q, k, v, iters=FLAGS.iters) * 1e3, 3)
        report(
            "attention", batch=B, length=T, heads=FLAGS.heads, head_dim=FLAGS.head_dim, packed=FLAGS.packed,
            impl=FLAGS.impl, max_segments=FLAGS.max_segments, bare_impl=bare_impl, **row,
            fwd_ratio=round(row["ours_fwd_ms"] / row["bare_fwd_ms"], 3),
            fwd_bwd_ratio=round(row["ours_fwd_bwd_ms"] / row["bare_fwd_bwd_ms"], 3),
        )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
