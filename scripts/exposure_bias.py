"""Exposure bias, measured: BLEU of a model's greedy choices on gold prefixes vs free-running greedy.

    python -m scripts.exposure_bias --config=configs/quickstart.py --workdir=runs/quickstart --split=test

"Gold prefix": one teacher-forced forward per sentence pair; at every position of the first
reference the argmax token given the source and the reference's prefix; those tokens (EOS
predictions dropped, so the hypothesis has the reference's length) form a hypothesis. "Free
running": greedy decoding from the model's own prefixes (eval.py --beam_size=1). Both are scored
with sacreBLEU against every reference; the gap between them is what feeding the model its own
predictions costs. Prints one JSON line.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flaxformer_lite import ops
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.evaluation import corpus_metrics, split_metrics
from flaxformer_lite.ids import EOS_ID
from flaxformer_lite.model.models import variant
from flaxformer_lite.train import experiment

config_flags.DEFINE_config_file("config", None, "The config the model was trained with.")
flags.DEFINE_string("workdir", None, "The trained workdir.")
flags.DEFINE_string("split", "test", "Split to score.")
flags.DEFINE_integer("max_examples", 0, "Sentences (0 = all).")


def gold_prefix_argmax(model, params, inputs, targets):
    """[B, T] argmax tokens given the source and the gold target prefix at each position."""
    seg = (targets > 0).astype(jnp.int32)
    logits = variant(model, deterministic=True).apply(
        {"params": params}, inputs, ops.shift_right(targets, seg), decoder_segment_ids=seg
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def main(argv):
    del argv
    f = flags.FLAGS
    exp = experiment.build(f.config, f.workdir, tokenizer="load")
    step, params = exp.restore_params()
    source = exp.data.open(f.split)
    n = len(source) if not f.max_examples else min(f.max_examples, len(source))
    examples = [source[i] for i in range(n)]
    srcs = [split_metrics.references(ex, exp.data.keys["inputs"])[0] for ex in examples]
    refs = [split_metrics.references(ex, exp.data.keys["targets"]) for ex in examples]
    tokenize = ip.Tokenize(exp.tokenizer, {"inputs": "s", "targets": "t"}, exp.config.max_length)
    forced = jax.jit(lambda p, x, y: gold_prefix_argmax(exp.inference_model, p, x, y))
    gold_hyps = []
    L, bs = exp.config.max_length, exp.config.batch_size
    for start in range(0, n, bs):
        x, y = np.zeros((bs, L), np.int32), np.zeros((bs, L), np.int32)
        for row, (s, r) in enumerate(zip(srcs[start : start + bs], refs[start : start + bs], strict=True)):
            ids = tokenize({"s": s, "t": r[0]})
            x[row, : len(ids["inputs"])], y[row, : len(ids["targets"])] = ids["inputs"], ids["targets"]
        out = np.asarray(forced(params, jnp.asarray(x), jnp.asarray(y)))
        out = np.where((y > 0) & (out != EOS_ID), out, 0)  # the gold target's positions, no EOS
        gold_hyps += [exp.tokenizer.decode([int(t) for t in row if t]) for row in out]
    gold_hyps = gold_hyps[:n]
    free, _ = split_metrics.translate_texts(
        exp.inference_model, params, exp.tokenizer, srcs, max_length=L,
        max_decode_length=exp.config.max_decode_length, batch_size=bs, mesh=exp.mesh,
    )  # fmt: skip
    streams = [[r[j] if j < len(r) else r[0] for r in refs] for j in range(max(len(r) for r in refs))]
    result = {"workdir": f.workdir, "step": step, "split": f.split, "examples": n}
    for name, hyps in (("gold_prefix_argmax", gold_hyps), ("free_running_greedy", free)):
        scores = corpus_metrics.bleu_and_chrf(hyps, streams)
        result[name] = {"bleu": round(scores["bleu"], 2), "chrf": round(scores["chrf"], 2)}
    result["bleu_gap"] = round(
        result["gold_prefix_argmax"]["bleu"] - result["free_running_greedy"]["bleu"], 2
    )
    print(json.dumps(result))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
