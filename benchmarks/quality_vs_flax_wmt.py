"""Translation quality at equal wall-clock time: the Flax WMT example's recipe on our data and eval.

    git clone https://github.com/google/flax /tmp/flax     # the anchor; never copied in here
    python train.py --config=configs/quickstart.py --workdir=runs/quickstart       # ours, timed
    python -m benchmarks.quality_vs_flax_wmt --flax_dir=/tmp/flax --config=configs/quickstart.py \
        --workdir=runs/quickstart --budget_s=<train.py's wall time> --output_dir=runs/flax_wmt

The anchor is the example's own code, imported from the checkout: `models.Transformer`,
`train.train_step` (its loss: label-smoothed cross entropy normalised by the smoothed target's
entropy; its rsqrt schedule with linear warmup; optax AdamW b2=0.98), `train.predict_step` (its beam
search, alpha 0.6) and `train.eval_step`, run under `jax.pmap` as its `train_and_evaluate` does.
Its data pipeline needs TensorFlow, so its two steps are re-done here in numpy: drop pairs longer
than `max_length` (its `length_filter`), then pack sentences in order into rows (its `pack_dataset`).
Everything else is shared with ours: the same train split, the same SentencePiece model (the
workdir's spm.model), the same model size and batch shape (from --config), the same budget, and
our evaluation (`split_metrics.evaluate_bleu`: every source translated (trimmed as ours), sacreBLEU
and chrF against both references, and the same perplexity over the split).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import jax_utils
from ml_collections import config_flags

from flaxformer_lite.evaluation import corpus_metrics, split_metrics
from flaxformer_lite.ids import EOS_ID
from flaxformer_lite.train import experiment

config_flags.DEFINE_config_file(
    "config", "configs/quickstart.py", "Our config: model size, data, batch shape."
)
flags.DEFINE_string("flax_dir", os.environ.get("FLAX_DIR"), "A checkout of github.com/google/flax.")
flags.DEFINE_string("workdir", None, "Our trained workdir: its spm.model and prepared data are reused.")
flags.DEFINE_float("budget_s", 600.0, "Wall-clock seconds of training (compile included).")
flags.DEFINE_float("learning_rate", 0.002, "The example's default peak rate (configs/default.py).")
flags.DEFINE_integer("warmup_steps", 1000, "The example's default warmup (configs/default.py).")
flags.DEFINE_float("attention_dropout", 0.1, "The example's default attention dropout.")
flags.DEFINE_integer("beam_size", 4, "The example's beam size.")
flags.DEFINE_string("split", "test", "Split evaluated at the end (validation for any tuning).")
flags.DEFINE_integer("log_every", 50, "Steps between training-loss records.")
flags.DEFINE_string("ours", "", "eval.py's JSON for our model on the same split (side by side).")
flags.DEFINE_string("output_dir", None, "Where the loss curve, hypotheses and JSON summary go.")
flags.mark_flags_as_required(["workdir", "output_dir"])
FLAGS = flags.FLAGS


def load_example(flax_dir: str | None):
    """The example's `models`, `decode` and `train` modules, from a flax checkout.

    train.py imports TensorFlow, clu and its tf-based input pipeline at module level; none of them
    is used by the step functions taken from it, so they are stubbed for the import only.
    """
    wmt = os.path.join(flax_dir or "", "examples", "wmt")
    if not flax_dir or not os.path.isfile(os.path.join(wmt, "train.py")):
        raise SystemExit(
            f"--flax_dir={flax_dir!r} holds no examples/wmt/train.py; get the anchor with "
            "`git clone https://github.com/google/flax /tmp/flax` and pass --flax_dir=/tmp/flax."
        )
    import flax.training.checkpoints  # noqa: F401  (imported first: flax.io probes for a real TensorFlow)

    stubs = ["tensorflow", "clu", "clu.metric_writers", "clu.periodic_actions", "bleu", "input_pipeline"]
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update({name: _Stub(name) for name in stubs if name not in sys.modules})
    sys.path.insert(0, wmt)
    try:
        loaded = []
        for name in ("models", "decode", "train"):
            spec = importlib.util.spec_from_file_location(name, os.path.join(wmt, f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # train.py's `import models` must find this one
            spec.loader.exec_module(module)
            loaded.append(module)
    finally:
        sys.path.remove(wmt)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
    return loaded


class _Stub(types.ModuleType):
    """A module whose every attribute is another stub (train.py's type annotations name tf.data...)."""

    def __getattr__(self, name: str):
        return _Stub(f"{self.__name__}.{name}")


def tokenized_pairs(source, sp, keys: dict, chunk: int = 8192) -> list[tuple[np.ndarray, np.ndarray]]:
    """(source ids + EOS, target ids + EOS) of every example, read and encoded a chunk at a time."""
    pairs = []
    for start in range(0, len(source), chunk):
        examples = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
        sides = [sp.encode([str(ex[keys[k]], "utf-8") for ex in examples]) for k in ("inputs", "targets")]
        pairs += [
            tuple(np.asarray(ids + [EOS_ID], np.int32) for ids in pair) for pair in zip(*sides, strict=True)
        ]
    return pairs


def packed_batches(pairs: list[tuple[np.ndarray, np.ndarray]], batch: int, length: int, seed: int):
    """Endless batches as the example's pipeline makes them: long pairs dropped, sentences packed in
    (shuffled) order into rows until the next one does not fit, rows batched."""
    pairs = [p for p in pairs if max(len(p[0]), len(p[1])) <= length]  # its length_filter
    rng = np.random.default_rng(seed)
    keys = ("inputs", "targets")
    rows, epoch = [], 0
    while True:
        order = rng.permutation(len(pairs))
        row = {k: [] for k in keys}
        for i in order:
            if any(sum(map(len, row[k])) + len(pairs[i][j]) > length for j, k in enumerate(keys)):
                rows.append(_row(row, length))
                row = {k: [] for k in keys}
            for j, k in enumerate(keys):
                row[k].append(pairs[i][j])
            if len(rows) == batch:
                yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, epoch
                rows = []
        epoch += 1


def _row(row: dict, length: int) -> dict:
    out = {}
    for k, seqs in row.items():
        ids, seg, pos = (np.zeros(length, np.int32) for _ in range(3))
        start = 0
        for s, seq in enumerate(seqs):
            ids[start : start + len(seq)] = seq
            seg[start : start + len(seq)] = s + 1
            pos[start : start + len(seq)] = np.arange(len(seq))
            start += len(seq)
        out.update({k: ids, f"{k}_segmentation": seg, f"{k}_position": pos})
    return out


def main(argv):
    del argv
    models, decode, train = load_example(FLAGS.flax_dir)
    c = FLAGS.config
    exp = experiment.build(c, FLAGS.workdir, tokenizer="load")  # our spm.model, data and model size
    ours = exp.model.config
    vocab = exp.tokenizer.get_piece_size()
    length, batch = c.max_length, c.batch_size
    assert ours.num_encoder_layers == ours.num_decoder_layers, "the example has one layer count"
    cfg = models.TransformerConfig(
        vocab_size=vocab, output_vocab_size=vocab, share_embeddings=True, logits_via_embedding=True,
        dtype=jnp.float32, emb_dim=ours.d_model, num_heads=ours.num_heads, num_layers=ours.num_encoder_layers,
        qkv_dim=ours.d_model, mlp_dim=ours.d_ff, max_len=max(length, c.max_decode_length) + 1,
        dropout_rate=ours.dropout_rate, attention_dropout_rate=FLAGS.attention_dropout, deterministic=False,
    )  # fmt: skip
    eval_cfg = cfg.replace(deterministic=True)
    predict_cfg = eval_cfg.replace(decode=True)
    os.makedirs(FLAGS.output_dir, exist_ok=True)

    # Data: our train split and tokenizer, ids + EOS untrimmed (the example filters, never trims).
    pairs = tokenized_pairs(exp.data.open(c.train_split), exp.tokenizer, exp.data.keys)
    batches = packed_batches(pairs, batch, length, c.seed)
    kept = sum(max(len(a), len(b)) <= length for a, b in pairs)
    logging.info(
        "anchor data: %d of %d train pairs fit %d tokens (the rest dropped)", kept, len(pairs), length
    )

    # Model and optimizer exactly as the example's train_and_evaluate builds them.
    rng = jax.random.key(c.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    init = jax.jit(models.Transformer(eval_cfg).init)
    params = init(init_rng, jnp.ones((1, length), jnp.float32), jnp.ones((1, length), jnp.float32))["params"]
    schedule = train.create_learning_rate_schedule(FLAGS.learning_rate, FLAGS.warmup_steps)
    import optax

    tx = optax.adamw(learning_rate=schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0)
    state = train.TrainState.create(apply_fn=None, params=params, tx=tx, dynamic_scale=None)
    state = jax_utils.replicate(state, jax.local_devices()[:1])
    p_train_step = jax.pmap(
        functools.partial(
            train.train_step, config=cfg, learning_rate_fn=schedule, label_smoothing=c.label_smoothing
        ),
        axis_name="batch", donate_argnums=(0,),
    )  # fmt: skip
    dropout_rngs = jax.random.split(dropout_rng, 1)

    curve, start, step = [], time.perf_counter(), 0
    window = []
    while time.perf_counter() - start < FLAGS.budget_s:
        host, epoch = next(batches)
        state, m = p_train_step(state, jax.tree.map(lambda x: x[None], host), dropout_rng=dropout_rngs)
        step += 1
        window.append(m)
        if step % FLAGS.log_every == 0:
            m = jax.device_get(window)
            loss = sum(float(x["loss"][0]) for x in m) / sum(float(x["denominator"][0]) for x in m)
            curve.append({"step": step, "seconds": time.perf_counter() - start, "loss": loss, "epoch": epoch})
            logging.info(
                "anchor step %d (%.0f s, epoch %d): loss %.3f", step, curve[-1]["seconds"], epoch, loss
            )
            window = []
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    params = jax.tree.map(lambda x: x[0], state.params)

    # Our evaluation with the example's decode: the same sources, trimming, references and sacreBLEU.
    max_decode = c.max_decode_length + 1  # its beam search writes a leading 0 that predict_step drops

    @jax.jit
    def predict(params, inputs):
        cache = train.initialize_cache(inputs, max_decode, predict_cfg)
        return train.predict_step(
            inputs, params, cache, decode.EOS_ID, max_decode, predict_cfg, beam_size=FLAGS.beam_size
        )

    result = split_metrics.evaluate_bleu(
        None, params, exp.tokenizer, exp.data.open(FLAGS.split), exp.data.keys, max_examples=0,
        max_length=length, max_decode_length=c.max_decode_length, batch_size=batch, mesh=exp.mesh,
        decode_fn=predict,
    )  # fmt: skip
    p_eval_step = jax.pmap(functools.partial(train.eval_step, config=eval_cfg), axis_name="batch")
    nll = den = 0.0
    for b in exp.eval_dataset(FLAGS.split):
        out = p_eval_step(state.params, {"inputs": b["inputs"][None], "targets": b["targets"][None]})
        out = jax.device_get(out)
        nll, den = nll + float(out["loss"][0]), den + float(out["denominator"][0])
    prefix = os.path.join(FLAGS.output_dir, f"{exp.data.tag}.{FLAGS.split}")
    for name, lines in [("hyp", result.pop("hypotheses")), ("src", result.pop("sources"))] + [
        (f"ref{j}", refs) for j, refs in enumerate(result.pop("references"))
    ]:
        with open(f"{prefix}.{name}.txt", "w", encoding="utf-8") as f:
            f.writelines(line.replace("\n", " ") + "\n" for line in lines)
    summary = {
        "anchor": "google/flax examples/wmt (train_step, predict_step, eval_step, models.Transformer)",
        "split": FLAGS.split, "train_seconds": seconds, "steps": step, "epochs_started": epoch + 1,
        "learning_rate": FLAGS.learning_rate, "warmup_steps": FLAGS.warmup_steps,
        "attention_dropout": FLAGS.attention_dropout, "dropout": ours.dropout_rate,
        "beam_size": FLAGS.beam_size,
        "train_pairs_kept": kept, "train_pairs": len(pairs),
        "perplexity": corpus_metrics.perplexity(nll, den),
        "tokens": den, **result, "curve": curve, "command": " ".join(sys.argv),
    }  # fmt: skip
    if FLAGS.ours:
        with open(FLAGS.ours) as f:
            ours_eval = json.load(f)
        keys = ("bleu", "chrf", "bleu_per_reference", "perplexity", "repeated_3gram_share", "checkpoint_step")
        summary["ours"] = {k: ours_eval[k] for k in keys}
    with open(f"{prefix}.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(
        f"anchor {FLAGS.split}: BLEU {summary['bleu']:.2f} chrF {summary['chrf']:.2f} "
        f"perplexity {summary['perplexity']:.2f} after {step} steps in {seconds:.0f} s ({prefix}.json)"
    )


if __name__ == "__main__":
    app.run(main)
