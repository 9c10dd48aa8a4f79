"""Print examples and SentencePiece tokens per split of the bundled corpora (for the results notes).

python scripts/corpus_stats.py --data_dir=/tmp/tfds --workdir=/tmp/spm [--vocab_size=16000]
"""

import argparse
import json
import os

from flaxformer_lite.data import datasets
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.data.tokenizer import load_or_train

SETS = {"bible_translate/en-de": ["en", "de"], "bible_translate/en-fr": ["en", "fr"], "bible_lm": ["text"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--vocab_size", type=int, default=16000)
    args = parser.parse_args()
    report = {}
    for name, features in SETS.items():
        model = os.path.join(args.workdir, name.replace("/", "_") + ".model")
        texts = lambda n=name, f=features: datasets.training_texts(
            datasets.open_source(n, "train", args.data_dir), f
        )  # noqa: E731
        sp = load_or_train(texts, model, vocab_size=args.vocab_size)
        tok = ip.Tokenize(sp, {f: f for f in features}, max_length=10**6)
        for split in ("train", "validation", "test"):
            src = datasets.open_source(name, split, args.data_dir)
            report[f"{name}:{split}"] = {"examples": len(src), "tokens": ip.token_counts(src, tok)}
            print(json.dumps({f"{name}:{split}": report[f"{name}:{split}"]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
