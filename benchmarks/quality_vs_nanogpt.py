"""LM quality at equal wall-clock time: nanoGPT's own train.py on our data, tokenizer and eval.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt     # the anchor; never copied in here
    python train.py --config=configs/lm_compare.py --workdir=runs/lm                # ours, timed
    python eval.py --config=configs/lm_compare.py --workdir=runs/lm --split=validation
    python -m benchmarks.quality_vs_nanogpt --nanogpt_dir=/tmp/nanogpt --config=configs/lm_compare.py \
        --workdir=runs/lm --budget_s=<train.py's wall time> --output_dir=runs/nanogpt

1. The train split of our dataset, tokenized with the workdir's spm.model, each document followed
   by EOS, is written as nanoGPT's `train.bin`/`val.bin` (uint16 token streams) and `meta.pkl`.
2. nanoGPT's unmodified `train.py` runs in a subprocess (CPU, float32, no torch.compile) with the
   model size, batch and context of --config and the recipe flags below; a 20-iteration calibration
   run first measures its seconds per iteration, so that `max_iters` (= its cosine's
   `lr_decay_iters`) fills --budget_s, as our num_train_steps fills ours.
3. Its final `ckpt.pt` is scored as our eval.py scores ours: every document of the split on its
   own (nanoGPT sees EOS before it, ours its BOS), the same target ids (ids + EOS, trimmed to
   max_length), token-level perplexity. With --ours=<eval.py's JSON> the token count is checked
   equal to ours and both sides land in one summary.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.evaluation import corpus_metrics
from flaxformer_lite.ids import EOS_ID
from flaxformer_lite.train import experiment

config_flags.DEFINE_config_file("config", "configs/lm_compare.py", "Our config: model size, data, batch.")
flags.DEFINE_string(
    "nanogpt_dir", os.environ.get("NANOGPT_DIR"), "A checkout of github.com/karpathy/nanoGPT."
)
flags.DEFINE_string("workdir", None, "Our trained workdir: its spm.model and prepared data are reused.")
flags.DEFINE_float("budget_s", 300.0, "Wall-clock seconds for nanoGPT's train.py (start to exit).")
flags.DEFINE_integer(
    "max_iters",
    0,
    "Train this many iterations instead of filling --budget_s (equal steps, not time; no calibration run).",
)
flags.DEFINE_multi_string(
    "recipe",
    # nanoGPT's recipe for small models (config/train_shakespeare_char.py: "baby networks can afford
    # to go a bit higher"), dropout 0 as its pretraining default (less than one epoch here).
    [
        "learning_rate=1e-3",
        "min_lr=1e-4",
        "beta2=0.99",
        "warmup_iters=100",
        "weight_decay=0.1",
        "dropout=0.0",
    ],
    "nanoGPT train.py flags (key=value) of the anchor's recipe.",
)
flags.DEFINE_string("split", "validation", "Split scored at the end.")
flags.DEFINE_string("ours", "", "eval.py's JSON for our model on the same split (side by side).")
flags.DEFINE_string("output_dir", None, "nanoGPT's data/, out/ and logs, and the JSON summary.")
flags.mark_flags_as_required(["workdir", "output_dir"])
FLAGS = flags.FLAGS


def documents(exp, split: str, max_length: int | None) -> list[np.ndarray]:
    """Every document of `split` as ids + EOS (trimmed to max_length as our pipeline trims)."""
    tokenize = ip.Tokenize(exp.tokenizer, exp.data.keys, max_length or 10**9)
    source = exp.data.open(split)
    return [tokenize(source[i])["targets"] for i in range(len(source))]


def run_nanogpt(args: list[str], cwd: str, log_path: str) -> tuple[float, list[float]]:
    """Run nanoGPT's train.py; (wall seconds, per-iteration milliseconds it printed)."""
    train_py = os.path.join(FLAGS.nanogpt_dir, "train.py")
    env = {**os.environ, "PYTHONPATH": FLAGS.nanogpt_dir}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, train_py, *args], cwd=cwd, env=env, stdout=log, stderr=log)
    seconds = time.perf_counter() - start
    text = open(log_path).read()
    if done.returncode:
        raise SystemExit(f"nanoGPT's train.py failed ({log_path}):\n{text[-2000:]}")
    return seconds, [float(ms) for ms in re.findall(r"^iter \d+: .* time ([\d.]+)ms", text, re.M)]


def score(ckpt_path: str, docs: list[np.ndarray], batch: int) -> tuple[float, float]:
    """(NLL sum, token count) of every document under nanoGPT's checkpoint, EOS as its context."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, FLAGS.nanogpt_dir)
    from model import GPT, GPTConfig  # nanoGPT's model.py

    ckpt = torch.load(ckpt_path, map_location="cpu")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    nll = count = 0.0
    with torch.no_grad():
        for start in range(0, len(docs), batch):
            chunk = docs[start : start + batch]
            width = max(len(d) for d in chunk)
            x = np.zeros((len(chunk), width), np.int64)
            y = np.full((len(chunk), width), -1, np.int64)
            for i, d in enumerate(chunk):
                x[i, 0], x[i, 1 : len(d)], y[i, : len(d)] = EOS_ID, d[:-1], d
            logits, _ = model(torch.from_numpy(x), torch.from_numpy(y))  # full logits when targets given
            loss = F.cross_entropy(
                logits.flatten(0, 1), torch.from_numpy(y).flatten(), ignore_index=-1, reduction="sum"
            )
            nll, count = nll + float(loss), count + float((y >= 0).sum())
    return nll, count


def main(argv):
    del argv
    if not FLAGS.nanogpt_dir or not os.path.isfile(os.path.join(FLAGS.nanogpt_dir, "train.py")):
        raise SystemExit(
            f"--nanogpt_dir={FLAGS.nanogpt_dir!r} holds no train.py; get the anchor with "
            "`git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt` and pass "
            "--nanogpt_dir=/tmp/nanogpt."
        )
    c = FLAGS.config
    exp = experiment.build(c, FLAGS.workdir, tokenizer="load")
    m = exp.model.config
    out = os.path.abspath(FLAGS.output_dir)
    data_dir = os.path.join(out, "data", "ours")
    os.makedirs(data_dir, exist_ok=True)
    # nanoGPT's train.py reads ./configurator.py and ./data/<dataset>/ from its working directory (out).
    link = os.path.join(out, "configurator.py")
    if not os.path.lexists(link):
        os.symlink(os.path.join(os.path.abspath(FLAGS.nanogpt_dir), "configurator.py"), link)
    vocab = exp.tokenizer.get_piece_size()
    assert vocab < 2**16, "nanoGPT's .bin files are uint16"
    for split, name in ((c.train_split, "train"), (c.eval_split, "val")):
        np.concatenate(documents(exp, split, None)).astype(np.uint16).tofile(
            os.path.join(data_dir, f"{name}.bin")
        )
    with open(os.path.join(data_dir, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)

    shape = [
        f"--n_layer={m.num_decoder_layers}", f"--n_head={m.num_heads}", f"--n_embd={m.d_model}",
        f"--block_size={c.max_length}", f"--batch_size={c.batch_size}", "--bias=True",
        "--dataset=ours", "--device=cpu", "--dtype=float32", "--compile=False",
        "--gradient_accumulation_steps=1",
        "--log_interval=1", "--eval_iters=10", "--always_save_checkpoint=True",
    ]  # fmt: skip
    recipe = [f"--{r}" for r in FLAGS.recipe]
    iters = FLAGS.max_iters
    if not iters:  # fill the budget: a short run measures nanoGPT's seconds per iteration first
        calib_s, times = run_nanogpt(
            shape + recipe
            + ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=1000", f"--out_dir={out}/calib"],
            out, os.path.join(out, "calibration.log"),
        )  # fmt: skip
        per_iter = statistics.median(times[5:]) / 1000
        overhead = calib_s - sum(times) / 1000  # start-up, data, the evaluation at iteration 0
        iters = int((FLAGS.budget_s - overhead) / per_iter)
        logging.info(
            "nanoGPT: %.3f s/iter, %.0f s overhead -> max_iters=%d for %.0f s",
            per_iter,
            overhead,
            iters,
            FLAGS.budget_s,
        )
    seconds, times = run_nanogpt(
        shape + recipe + [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}",
                          f"--out_dir={out}/out"],
        out, os.path.join(out, "train.log"),
    )  # fmt: skip
    if FLAGS.max_iters:  # no calibration run: the training run's own median
        per_iter = statistics.median(times[5:] or times) / 1000
    docs = documents(exp, FLAGS.split, c.max_length)
    nll, count = score(os.path.join(out, "out", "ckpt.pt"), docs, c.batch_size)
    summary = {
        "anchor": "karpathy/nanoGPT train.py + model.py", "split": FLAGS.split, "train_seconds": seconds,
        "max_iters": iters, "seconds_per_iter": per_iter, "recipe": FLAGS.recipe, "nll": nll / count,
        "perplexity": corpus_metrics.perplexity(nll, count), "tokens": count, "command": " ".join(sys.argv),
    }  # fmt: skip
    if FLAGS.ours:
        with open(FLAGS.ours) as f:
            ours = json.load(f)
        if ours["tokens"] != count:
            raise SystemExit(
                f"{FLAGS.ours} scored {ours['tokens']} tokens, nanoGPT {count}: not the same targets"
            )
        summary["ours"] = {k: ours[k] for k in ("perplexity", "nll", "tokens", "checkpoint_step")}
    with open(os.path.join(out, f"nanogpt.{FLAGS.split}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(
        f"nanoGPT {FLAGS.split}: perplexity {summary['perplexity']:.2f} over {count:.0f} tokens after "
        f"{iters} iterations in {seconds:.0f} s"
    )


if __name__ == "__main__":
    app.run(main)
