"""Training throughput of a config on synthetic tokens: step time, tokens/s, MFU.

    python -m benchmarks.train_throughput --config=configs/wmt_base.py --batch=64 --length=256
    python -m benchmarks.train_throughput --config=configs/gpt2_small.py --batch=12 --length=1024

Tokens/s counts target tokens (plus source tokens, reported separately, for translation). MFU =
useful training FLOPs (flaxformer_lite.model.flops, checked against XLA's count in tests) per second
over the devices' dense bf16 peak; None on devices without a known peak (CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import load_config, report, synthetic_batch, time_fn
from flaxformer_lite import sharding
from flaxformer_lite.model import flops
from flaxformer_lite.train import experiment

flags.DEFINE_string("config", "configs/wmt_base.py", "Experiment config file.")
flags.DEFINE_integer("batch", 64, "Global batch (sequences or sentence pairs).")
flags.DEFINE_integer("length", 256, "Tokens per sequence (source and target each).")
flags.DEFINE_integer("vocab", 32_000, "Vocabulary size (no tokenizer is trained).")
flags.DEFINE_integer("iters", 10, "Timed steps.")
flags.DEFINE_multi_string("set", [], "Overrides of model fields, e.g. --set=scan_layers=False.")
flags.DEFINE_float("ema_decay", 0.0, "> 0: the step also updates a moving average of the params.")
FLAGS = flags.FLAGS


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(value, value)


def main(argv):
    del argv
    config = load_config(FLAGS.config)
    config.batch_size, config.max_length = FLAGS.batch, FLAGS.length
    config.ema_decay = FLAGS.ema_decay
    for item in FLAGS.set:
        key, value = item.split("=", 1)
        config.model.overrides[key] = _parse(value)
    exp = experiment.build(config, None, tokenizer="none", vocab_size=FLAGS.vocab)
    model, mesh = exp.model, exp.mesh
    state, shardings = exp.init_state(jax.random.key(0))
    jitted = exp.train_step(shardings)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(synthetic_batch(exp.task, FLAGS.batch, FLAGS.length, FLAGS.vocab), mesh)
        rng = jax.random.key(1)
        holder = [state]

        def run(b):
            holder[0], metrics = jitted(holder[0], b, rng)
            return metrics["loss"]

        seconds = time_fn(run, batch, iters=FLAGS.iters)
    cfg = model.config
    source = FLAGS.length if exp.task.paired else 0
    per_seq = flops.train_flops(cfg, FLAGS.length, source)
    peak = flops.peak_tflops(jax.devices()[0].device_kind)
    achieved = per_seq * FLAGS.batch / seconds
    report(
        "train_throughput",
        config=FLAGS.config,
        overrides=FLAGS.set,
        ema_decay=FLAGS.ema_decay,
        params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
        batch=FLAGS.batch,
        length=FLAGS.length,
        step_ms=round(seconds * 1e3, 2),
        target_tokens_per_sec=round(FLAGS.batch * FLAGS.length / seconds),
        source_tokens_per_sec=round(FLAGS.batch * source / seconds),
        model_tflops_per_sec=round(achieved / 1e12, 2),
        mfu=round(achieved / (peak * 1e12 * jax.device_count()), 4) if peak else None,
        dtype=str(jnp.dtype(cfg.dtype)),
    )


if __name__ == "__main__":
    app.run(main)
