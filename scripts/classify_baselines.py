"""Baselines for Bible paraphrase detection (issue 30): the majority class and a logistic regression
on word-overlap features, so the Transformers' accuracy and F1 have something to be read against.

    python scripts/classify_baselines.py --data_dir=runs/classify/tfds \
        --out=docs/results/classify/baselines.json \
        --predictions=runs/classify/scratch/eval/bible_paraphrase.test.predictions.tsv  # also: by pair kind

Features of a pair (a, b), lowercased words without punctuation: word and bigram Jaccard overlap,
the share of a's words in b and of b's in a, the shorter/longer length ratio. The regression is
numpy gradient descent on standardised features (no scikit-learn needed), fit on train.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxformer_lite.data import datasets
from flaxformer_lite.tasks import classification

_WORD = re.compile(r"[a-z0-9']+")


def features(a: str, b: str) -> list[float]:
    """Word-overlap features of a pair (see the module docstring)."""
    wa, wb = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    sa, sb = set(wa), set(wb)
    ba, bb = set(zip(wa, wa[1:], strict=False)), set(zip(wb, wb[1:], strict=False))
    jac = lambda x, y: len(x & y) / max(len(x | y), 1)  # noqa: E731
    return [
        jac(sa, sb),
        jac(ba, bb),
        len(sa & sb) / max(len(sa), 1),
        len(sa & sb) / max(len(sb), 1),
        min(len(wa), len(wb)) / max(len(wa), len(wb), 1),
    ]


def load(split: str, data_dir: str):
    """(features [N, 5], labels [N], pair kinds [N]: positive | hard | random) of a split, in order."""
    source = datasets.open_source("bible_paraphrase", split, data_dir)
    rows = [source[i] for i in range(len(source))]
    x = np.array([features(r["text_a"].decode(), r["text_b"].decode()) for r in rows])
    return x, np.array([int(r["label"]) for r in rows]), np.array([r["kind"].decode() for r in rows])


def by_kind(labels: np.ndarray, predictions: np.ndarray, kinds: np.ndarray) -> dict:
    """Accuracy on the positives, the hard negatives and the random negatives separately."""
    return {
        k: float(np.mean(labels[kinds == k] == predictions[kinds == k]))
        for k in ("positive", "hard", "random")
    }


def predictions_file(path: str) -> np.ndarray:
    """The predicted class ids of an eval.py predictions.tsv (its p(...) columns, argmax)."""
    rows = [line.split("\t") for line in open(path).read().splitlines()[1:]]
    return np.array([int(np.argmax([float(x) for x in r[-2:]])) for r in rows])


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 3000, lr: float = 0.5):
    """(weights, bias, mean, std): full-batch gradient descent on the mean log loss."""
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        w -= lr * z.T @ (p - y) / len(y)
        b -= lr * float(np.mean(p - y))
    return w, b, mean, std


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_dir", required=True, help="TFDS data dir (bible_paraphrase prepared on first use)"
    )
    parser.add_argument("--out", default="", help="write the results JSON here")
    parser.add_argument("--predictions", nargs="*", default=[], help="eval.py test predictions.tsv files")
    args = parser.parse_args()
    x_train, y_train, _ = load("train", args.data_dir)
    w, b, mean, std = fit_logistic(x_train, y_train)
    results = {}
    for split in ("validation", "test"):
        x, y, kinds = load(split, args.data_dir)
        majority = int(np.bincount(y_train).argmax())  # the training split's majority class
        p = 1 / (1 + np.exp(-(((x - mean) / std) @ w + b)))
        pred = (p > 0.5).astype(int)
        loss = float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
        results[split] = {
            "majority_class": classification.scores(y, np.full_like(y, majority), 2),
            "word_overlap_logistic": {**classification.scores(y, pred, 2), "loss": loss,
                                      "accuracy_by_kind": by_kind(y, pred, kinds)},
            "examples": len(y),
        }  # fmt: skip
    for path in args.predictions:  # the models' test predictions, by kind
        results["test"][path] = by_kind(y, predictions_file(path), kinds)
    names = ["word_jaccard", "bigram_jaccard", "a_in_b", "b_in_a", "length_ratio"]
    results["feature_weights"] = dict(zip(names, map(float, w), strict=True))
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
