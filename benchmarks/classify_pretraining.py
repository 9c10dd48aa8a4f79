"""Does pretraining pay off? (issue 41): fine-tune pretrained and scratch bodies on bible_paraphrase.

Reads the three pretraining workdirs (configs/classify_mlm.py, the same with next_sentence=True,
configs/classify_lm.py; run them first, see docs/results/classify/README.md), then fine-tunes per seed:

- models: `scratch_enc` (configs/classify.py, random init), `mlm`, `mlm_nsp` (the same encoder
  from the MLM / MLM+NSP bodies), `scratch_dec` (configs/classify_causal.py, random init), `lm`;
- training data: `original` (bible_paraphrase) or `adversarial` (bible_paraphrase/adversarial), all
  of its train split or its first N examples (`train[:N]`; prepared splits are stored shuffled);
- every model is scored by our eval path (`evaluation.run.evaluate_workdir`) on *both* test sets.

Every run uses the pretraining runs' SentencePiece model (a scratch control gets a copy before it
starts), so a pretrained body and its control differ only in their initial weights. One JSON line per
run in --out/runs.jsonl; a run already there is skipped, so an interrupted sweep resumes. Then
`--report` writes table.md, curve.png (accuracy against labelled examples) and pretraining.png.

    python -m benchmarks.classify_pretraining --seeds=0,1,2 --data=original,adversarial
    python -m benchmarks.classify_pretraining --seeds=0,1,2 --data=original --sizes=1000,4000
    python -m benchmarks.classify_pretraining --report
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from benchmarks import common

ROOT = "runs/classify"
PRETRAINED = {"mlm": "pre_mlm", "mlm_nsp": "pre_mlm_nsp", "lm": "pre_lm"}  # model -> workdir in ROOT
MODELS = {  # model -> (config file, init_from workdir or "" for scratch)
    "scratch_enc": ("configs/classify.py", ""),
    "mlm": ("configs/classify.py", "pre_mlm"),
    "mlm_nsp": ("configs/classify.py", "pre_mlm_nsp"),
    "scratch_dec": ("configs/classify_causal.py", ""),
    "lm": ("configs/classify_causal.py", "pre_lm"),
}
STEPS = 150  # fine-tuning steps (other budgets get their own workdirs and --out)
DATASETS = {"original": "bible_paraphrase", "adversarial": "bible_paraphrase/adversarial"}


def key_of(model: str, data: str, size: str, seed: int) -> str:
    return f"{model}.{data}.{size}.s{seed}"


def run_one(key: str, steps: int, data_dir: str) -> dict:
    """Fine-tune and test one run in this process: its row for runs.jsonl."""
    from flaxformer_lite.data.datasets import sources
    from flaxformer_lite.evaluation import run as evaluation
    from flaxformer_lite.train import loop

    model, data, size, seed = key.split(".")
    config_path, init_from = MODELS[model]
    config = common.load_config(config_path)
    workdir = os.path.join(ROOT, "ft" if steps == STEPS else f"ft_{steps}steps", key)
    config.dataset_name, config.data_dir, config.seed = DATASETS[data], data_dir, int(seed[1:])
    config.train_split = "train" if size == "all" else f"train[:{size}]"
    config.num_train_steps = config.checkpoint_every = steps
    config.warmup_steps = max(1, steps // 10)
    if init_from:
        config.init_from = os.path.join(ROOT, init_from)
    else:  # the pretraining runs' tokenizer, so that only the initial weights differ
        os.makedirs(workdir, exist_ok=True)
        tokenizer_from = os.path.join(ROOT, "pre_lm" if "dec" in model else "pre_mlm")
        for name in ("spm.model", "spm.model.options.json"):
            if not os.path.exists(os.path.join(workdir, name)):
                shutil.copy(os.path.join(tokenizer_from, name), workdir)
    start = time.time()
    valid = loop.train_and_evaluate(config, workdir)
    row = {"key": key, "model": model, "data": data, "size": size, "seed": int(seed[1:]), "steps": steps,
           "train_seconds": round(time.time() - start, 1), "load_after": os.getloadavg()[0],
           "train_examples": len(sources.open_source(config.dataset_name, config.train_split, data_dir)),
           "validation": {k: valid.get(k) for k in ("accuracy", "nll")}}  # fmt: skip
    for test_data, name in DATASETS.items():
        config.dataset_name = name
        summary = evaluation.evaluate_workdir(
            config, workdir, "test", beams=1, alpha=0.0, max_examples=0, batch_size=0,
            output_dir=os.path.join(workdir, "eval"),
        )  # fmt: skip
        row[f"test_{test_data}"] = {k: summary[k] for k in ("accuracy", "f1", "loss", "examples")}
    return row


def body_scores(model: str, split: str, data_dir: str) -> dict:
    """A pretraining run's scores on bible_lm `split`, each objective apart: masked-token (MLM) or
    next-token (LM) loss and accuracy, and for MLM+NSP the next-sentence pair accuracy, from the
    task's own forward (masking key fixed), whereas the train loop's eval mixes the two objectives."""
    import jax
    import numpy as np

    from flaxformer_lite import sharding
    from flaxformer_lite.train import experiment

    config = common.load_config("configs/classify_lm.py" if model == "lm" else "configs/classify_mlm.py")
    config.data_dir, config.next_sentence = data_dir, model == "mlm_nsp"
    exp = experiment.build(config, os.path.join(ROOT, PRETRAINED[model]), tokenizer="load")
    _, params = exp.restore_params(None)
    forward = jax.jit(lambda p, b: exp.task.forward(exp.inference_model, p, b, jax.random.key(0)))
    sums = np.zeros(5)  # token nll, token weight, token correct, pair correct, pairs
    with jax.set_mesh(exp.mesh):
        for batch in exp.eval_dataset(split):
            logits, targets, weights = jax.device_get(forward(params, sharding.global_batch(batch, exp.mesh)))
            logp = jax.nn.log_softmax(np.asarray(logits, np.float32))
            nll = -np.take_along_axis(logp, targets[..., None].astype(np.int64), -1)[..., 0]
            right = logp.argmax(-1) == targets
            t = batch["targets"].shape[1]  # positions past t are next-sentence pairs (MLM+NSP)
            tok, pair = np.s_[:, :t], np.s_[:, t:]
            sums += [(nll[tok] * weights[tok]).sum(), weights[tok].sum(), (right[tok] * weights[tok]).sum(),
                     (right[pair] * (weights[pair] > 0)).sum(), (weights[pair] > 0).sum()]  # fmt: skip
    out = {"split": split, "token_loss": sums[0] / sums[1], "token_accuracy": sums[2] / sums[1],
           "tokens_scored": int(sums[1])}  # fmt: skip
    if sums[4]:
        out.update(next_sentence_accuracy=sums[3] / sums[4], pairs=int(sums[4]))
    return out


def sweep(args) -> None:
    out = os.path.join(args.out, "runs.jsonl")
    for name in PRETRAINED.values():
        if not os.path.exists(os.path.join(ROOT, name, "final_metrics.json")):
            sys.exit(f"pretraining run {ROOT}/{name} is not finished; train it first (see the docstring).")
    done = common.done_keys(out)  # each key below is run once, so the file is read once
    for seed in map(int, args.seeds.split(",")):
        for size in args.sizes.split(","):
            for data in args.data.split(","):
                for model in args.models.split(","):
                    key = key_of(model, data, size, seed)
                    if key in done:
                        continue
                    print(f"== {key}", flush=True)
                    command = [sys.executable, "-m", "benchmarks.classify_pretraining", f"--one={key}",
                               f"--steps={args.steps}", f"--out={args.out}"]  # fmt: skip
                    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/classify")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default="original,adversarial")
    parser.add_argument("--sizes", default="all")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--one", default="", help="(internal) run this key in this process")
    parser.add_argument("--report", action="store_true", help="only write table.md and the plots")
    parser.add_argument("--bodies", action="store_true", help="score the pretrained bodies (bodies.json)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        data_dir = os.path.abspath(os.path.join(ROOT, "tfds"))
        common.append_row(os.path.join(args.out, "runs.jsonl"), run_one(args.one, args.steps, data_dir))
    elif args.bodies:
        data_dir = os.path.abspath(os.path.join(ROOT, "tfds"))
        scores = {m: [body_scores(m, s, data_dir) for s in ("validation", "test")] for m in PRETRAINED}
        with open(os.path.join(args.out, "bodies.json"), "w") as f:
            json.dump(scores, f, indent=1)
        print(json.dumps(scores, indent=1))
    elif args.report:
        from benchmarks import classify_report

        classify_report.write(args.out, ROOT)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
