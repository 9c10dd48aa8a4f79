"""eval.py and generate.py for classification tasks: scores and predictions, stdin lines -> labels.

Kept apart from the entry points (each calls one function here) so that their translation and LM
paths stay as they are.
"""

from __future__ import annotations

import collections
import functools
import json
import os

import jax
import numpy as np

from flaxformer_lite import cli, files, sharding
from flaxformer_lite.data.pipeline import text_of
from flaxformer_lite.tasks import classification

# Jitted once per model (Linen modules hash by value), as evaluation.py's steps.
_probabilities = jax.jit(
    sharding.under_rules(lambda params, batch, *, model: classification.probabilities(model, params, batch)),
    static_argnames=("model",),
)


def predict(exp, params, split: str, max_examples: int = 0):
    """(probabilities [N, C], labels [N]) of the first `max_examples` examples of `split` (0 = all),
    in the split's order: one unpacked row per example (the eval dataset drops none)."""
    probs, labels, n = [], [], 0
    step = functools.partial(_probabilities, model=exp.inference_model)
    with jax.set_mesh(exp.mesh):
        for batch in exp.eval_dataset(split):
            p, y, present = jax.device_get(step(params, sharding.global_batch(batch, exp.mesh)))
            keep = present[:, 0] > 0  # rows after the split's end are padding
            probs.append(p[keep, 0]), labels.append(y[keep, 0])
            n += int(keep.sum())
            if max_examples and n >= max_examples:
                break
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    end = max_examples or len(labels)
    return probs[:end], labels[:end]


def summarize(probs: np.ndarray, labels: np.ndarray, names) -> dict:
    """Accuracy, F1, mean cross-entropy and the majority-class baseline of predictions."""
    gold = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    counts = collections.Counter(labels.tolist())
    result = classification.scores(labels, probs.argmax(-1), len(names))
    result.update(
        loss=float(-np.mean(np.log(gold))),
        examples=len(labels),
        classes=list(names),
        label_counts={names[k]: v for k, v in sorted(counts.items())},
        majority_class_accuracy=max(counts.values()) / len(labels),
    )
    return result


def evaluate_and_write(
    exp, params, split: str, *, out_dir: str, summary: dict, max_examples: int = 0
) -> dict:
    """Score `split`, write `<dataset>.<split>.predictions.tsv` (texts, label, prediction, one
    probability per class) and `.json` into `out_dir` (all or none); returns the summary."""
    probs, labels = predict(exp, params, split, max_examples)
    names = exp.data.labels
    summary = {**summary, **summarize(probs, labels, names)}
    which = "".join(
        f".{summary[k]}" for k, d in (("checkpoint", "last"), ("weights", "auto")) if summary.get(k, d) != d
    )
    prefix = os.path.join(out_dir, f"{exp.data.tag}.{split}{which}")
    source, texts = exp.data.open(split), list(exp.data.keys.values())
    header = [*texts, "label", "prediction", *(f"p({n})" for n in names)]
    rows = ["\t".join(header)]
    for i, (p, y) in enumerate(zip(probs, labels, strict=True)):
        fields = [text_of(source[i][t]).replace("\t", " ").replace("\n", " ") for t in texts]
        rows.append("\t".join([*fields, names[y], names[int(p.argmax())], *(f"{x:.6f}" for x in p)]))
    summary["files"] = prefix + ".*"
    os.makedirs(out_dir, exist_ok=True)
    files.write_all(
        {
            f"{prefix}.predictions.tsv": "\n".join(rows) + "\n",
            f"{prefix}.json": json.dumps(summary, indent=1),
        },
        fix="free space (or pick another --output_dir) and rerun",
    )
    return summary


def describe(summary: dict) -> str:
    """What eval.py prints for a classification summary."""
    return (
        f"{summary['split']} (step {summary['checkpoint_step']}): accuracy {summary['accuracy']:.4f}  "
        f"F1 {summary['f1']:.4f} ({summary['f1_kind']})  loss {summary['loss']:.4f}  "
        f"on {summary['examples']} "
        f"examples (majority class {summary['majority_class_accuracy']:.4f})\noutputs: {summary['files']}"
    )


def classify_lines(exp, params, lines, out, err) -> dict:
    """One `label<TAB>p(class 0)<TAB>...` line per stdin line (a pair as `a<TAB>b`); "" for empty ones."""
    texts = list(exp.data.keys.values())
    tokenize = exp.tokenize()
    counts = {"lines": 0, "empty": 0, "replaced_bytes": 0, "unpaired": 0}
    for text in cli.text_lines(lines, counts):
        counts["lines"] += 1
        if not text.strip():
            counts["empty"] += 1
            out.write("\n")
            out.flush()
            continue
        parts = text.split("\t", 1) if len(texts) == 2 else [text]
        counts["unpaired"] += len(parts) < len(texts)
        example = dict(zip(texts, parts + [""] * (len(texts) - len(parts)), strict=True))
        p = _classify_one(exp, params, tokenize, example)
        names = exp.data.labels
        out.write("\t".join([names[int(p.argmax())], *(f"{x:.4f}" for x in p)]) + "\n")
        out.flush()
    if counts["empty"] or counts["unpaired"] or tokenize.stats.trimmed:
        err.write(
            f"{counts['empty']} empty lines, {counts['unpaired']} lines without a tab classified as one "
            "text, "
            f"{tokenize.stats.trimmed} lines trimmed to {exp.config.max_length} tokens\n"
        )
    return counts


def _classify_one(exp, params, tokenize, example: dict) -> np.ndarray:
    """Class probabilities [C] of one example, in a row of its own (padded to max_length)."""
    row = tokenize(example)
    length, n = exp.config.max_length, len(row["targets"])
    batch = {}
    for name, values in row.items():
        batch[name] = np.zeros((1, length), np.int32)
        batch[name][0, :n] = values
        batch[f"{name}_segment_ids"] = (np.arange(length) < n).astype(np.int32)[None]
        batch[f"{name}_positions"] = np.where(np.arange(length) < n, np.arange(length), 0).astype(np.int32)[
            None
        ]
    probs, _, _ = _probabilities(params, batch, model=exp.inference_model)
    return np.asarray(probs)[0, 0]
