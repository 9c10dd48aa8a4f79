"""Decoding throughput on random weights and tokens (speed does not depend on the values).

    python -m benchmarks.decode_throughput --config=configs/wmt_base.py   # beam 4 and greedy translation
    python -m benchmarks.decode_throughput --config=configs/gpt2_small.py --lm_batches=1,64

Translation: batch x source_len sources, exactly new_tokens decoded (EOS can never win: its logit
is masked, like the anchor's "no early EOS"), sentences/s. LM: a prompt of prompt_len tokens and
new_tokens sampled greedily per row, generated tokens/s at each batch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import load_config, report, time_fn
from flaxformer_lite import decoding
from flaxformer_lite.train import experiment

flags.DEFINE_string("config", "configs/wmt_base.py", "Experiment config file.")
flags.DEFINE_integer("vocab", 32_000, "Vocabulary size.")
flags.DEFINE_integer("batch", 32, "Translation: sentences per batch.")
flags.DEFINE_integer("source_len", 64, "Translation: source tokens.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
flags.DEFINE_list("beams", ["4", "1"], "Translation: beam sizes (1 = greedy).")
flags.DEFINE_list("lm_batches", ["1", "64"], "LM: batch sizes.")
flags.DEFINE_integer("prompt_len", 64, "LM: prompt tokens.")
flags.DEFINE_integer("iters", 5, "Timed calls.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = load_config(FLAGS.config)
    config.max_length = max(FLAGS.source_len, FLAGS.prompt_len + FLAGS.new_tokens)
    config.max_decode_length = FLAGS.new_tokens
    exp = experiment.build(config, None, tokenizer="none", vocab_size=FLAGS.vocab)
    model = exp.inference_model
    rng = jax.random.key(0)
    if exp.task.translates:
        sources = jax.random.randint(rng, (FLAGS.batch, FLAGS.source_len), 3, FLAGS.vocab)
        params = jax.jit(model.init)(rng, sources[:1], sources[:1])["params"]
        for beams in map(int, FLAGS.beams):
            no_eos = dict(eos_id=-1) if beams == 1 else dict(eos_id=FLAGS.vocab + 1)  # never produced

            @jax.jit
            def decode(p, x, beams=beams, no_eos=no_eos):
                if beams == 1:
                    return decoding.translate(model, p, x, FLAGS.new_tokens, **no_eos)
                return decoding.translate_beam(model, p, x, FLAGS.new_tokens, beams=beams, **no_eos)

            seconds = time_fn(decode, params, sources, iters=FLAGS.iters)
            report(
                "decode_translation", config=FLAGS.config, beams=beams, batch=FLAGS.batch,
                source_len=FLAGS.source_len, new_tokens=FLAGS.new_tokens, batch_ms=round(seconds * 1e3, 2),
                sentences_per_sec=round(FLAGS.batch / seconds, 1),
            )  # fmt: skip
        return
    params = jax.jit(model.init)(rng, jnp.ones((1, 8), jnp.int32))["params"]
    for batch in map(int, FLAGS.lm_batches):
        prompt = jax.random.randint(rng, (batch, FLAGS.prompt_len), 3, FLAGS.vocab)
        generate = jax.jit(lambda p, x: decoding.lm_generate(model, p, x, FLAGS.new_tokens, eos_id=-1))
        seconds = time_fn(generate, params, prompt, iters=FLAGS.iters)
        report(
            "decode_lm", config=FLAGS.config, batch=batch, prompt_len=FLAGS.prompt_len,
            new_tokens=FLAGS.new_tokens, call_ms=round(seconds * 1e3, 2),
            tokens_per_sec=round(batch * FLAGS.new_tokens / seconds, 1),
        )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
