"""The word-overlap baseline of paraphrase detection (issues 30, 41): a logistic regression on five
features of a pair, so the Transformers' accuracy and F1 have something to be read against.

Features of a pair (a, b), lower-cased words without punctuation: word and bigram Jaccard overlap,
the share of a's words in b and of b's in a, the shorter/longer length ratio. The regression is
numpy gradient descent on standardised features (no scikit-learn needed). On `bible_paraphrase`
it nearly solves the task; on `bible_paraphrase/adversarial`, whose negatives have their
positive's very words, only the bigram overlap can tell them apart.

    python scripts/classify_baselines.py --data_dir=runs/classify/tfds \
        --out=docs/results/classify/overlap_baseline.json
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from flaxformer_lite.data import datasets
from flaxformer_lite.data.pipeline import text_of
from flaxformer_lite.tasks import classification

WORD = re.compile(r"[a-z0-9']+")
FEATURES = ("word_jaccard", "bigram_jaccard", "a_in_b", "b_in_a", "length_ratio")


def features(a: str, b: str) -> list[float]:
    """The FEATURES of a pair of texts (see the module docstring)."""
    wa, wb = WORD.findall(a.lower()), WORD.findall(b.lower())
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


def load(name: str, split: str, data_dir: str, **builder_kwargs):
    """(features [N, 5], labels [N], pair kinds [N]) of a pair classification split, in order."""
    source = datasets.open_source(name, split, data_dir, **builder_kwargs)
    rows = [source[i] for i in range(len(source))]
    x = np.array([features(text_of(r["text_a"]), text_of(r["text_b"])) for r in rows])
    kinds = np.array([text_of(r["kind"]) if "kind" in r else "" for r in rows])
    return x, np.array([int(r["label"]) for r in rows]), kinds


@dataclasses.dataclass(frozen=True)
class Logistic:
    """A fitted logistic regression on standardised features."""

    weights: np.ndarray  # [F]
    bias: float
    mean: np.ndarray  # [F] of the training features
    std: np.ndarray  # [F]

    def probability(self, x: np.ndarray) -> np.ndarray:
        """p(label 1) [N] of features [N, F]."""
        return 1 / (1 + np.exp(-(((x - self.mean) / self.std) @ self.weights + self.bias)))


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 3000, lr: float = 0.5) -> Logistic:
    """Full-batch gradient descent on the mean log loss of features [N, F] and 0/1 labels [N]."""
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        w -= lr * z.T @ (p - y) / len(y)
        b -= lr * float(np.mean(p - y))
    return Logistic(w, b, mean, std)


def by_kind(labels: np.ndarray, predictions: np.ndarray, kinds: np.ndarray) -> dict:
    """Accuracy on each kind of pair (positive, hard, random, swap_names, swap_nouns) separately."""
    return {str(k): float(np.mean(labels[kinds == k] == predictions[kinds == k])) for k in sorted(set(kinds))}


def score(model: Logistic, x: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> dict:
    """Accuracy, F1 (paraphrase), mean log loss and accuracy by kind of `model` on a split."""
    p = model.probability(x)
    pred = (p > 0.5).astype(int)
    loss = float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
    return {**classification.scores(y, pred, 2), "loss": loss, "accuracy_by_kind": by_kind(y, pred, kinds)}


def evaluate(
    data_dir: str, train_on: str, test_on: tuple[str, ...], train_split: str = "train", **builder_kwargs
) -> dict:
    """The baseline fit on `train_on`'s `train_split` (a slice such as "train[:1000]": fewer labelled
    pairs), scored on the validation and test splits of each dataset of `test_on` (beside the
    training split's majority class)."""
    x, y, _ = load(train_on, train_split, data_dir, **builder_kwargs)
    model, majority = fit_logistic(x, y), int(np.bincount(y).argmax())
    weights = dict(zip(FEATURES, map(float, model.weights), strict=True))
    out = {"trained_on": f"{train_on} {train_split} ({len(y)} pairs)", "weights": weights}
    for name in test_on:
        for split in ("validation", "test"):
            x, y, kinds = load(name, split, data_dir, **builder_kwargs)
            out[f"{name} {split}"] = {
                "examples": len(y),
                "majority_class": classification.scores(y, np.full_like(y, majority), 2),
                "word_overlap_logistic": score(model, x, y, kinds),
            }
    return out
