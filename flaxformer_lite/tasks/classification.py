"""Sentence and sentence-pair classification: data layout, forward passes, metrics, frozen bodies.

One layout for both families, BERT's: `[CLS] a [SEP] (b [SEP])` with token types 0 for the
first text and 1 for the second, where our tokenizer's [CLS] is id 0 (the start id the decoder
family reads first after `shift_right`, so an LM sees the position-0 token it was trained on) and
[SEP] is EOS. EncoderOnly pools each sequence's first token ([CLS]); DecoderOnly its last real
token (the final [SEP], the only one that has read the whole pair) or the mean
(`ModelConfig.pooling`). Packed rows carry several examples: pooling is per segment, labels ride
along as a per-token feature (constant within a sequence) and are read at each sequence's start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxformer_lite.data.pipeline import TokenizeStats, text_of
from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.model.models import DecoderOnly
from flaxformer_lite.ops import pooling

LABEL = "label"  # the class feature of every classification dataset (tfds ClassLabel)
# What a frozen body still trains: the parameters a classification head adds on top of it.
HEAD_PARAMS = ("classifier", "pooler")


def special_ids(sp) -> tuple[int | None, int]:
    """([CLS] id or None, [SEP] id) for a tokenizer: ours (0, EOS), or a transformers one's own."""
    tok = getattr(sp, "tok", None)  # interop's wrapper around a transformers tokenizer.json
    if tok is None:
        return PAD_ID, EOS_ID
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "<|endoftext|>", "</s>", "<s>")}
    if ids["[CLS]"] is not None and ids["[SEP]"] is not None:  # BERT's vocabulary
        return ids["[CLS]"], ids["[SEP]"]
    sep = next((ids[t] for t in ("<|endoftext|>", "</s>") if ids[t] is not None), EOS_ID)
    return ids["<s>"], sep


def text_features(features) -> list[str]:
    """The text features of a classification dataset: ["text"] or ["text_a", "text_b"] (pairs)."""
    names = ["text_a", "text_b"] if "text_a" in features else ["text"]
    missing = [n for n in [*names, LABEL] if n not in features]
    if missing:
        raise ValueError(
            f"the dataset has no {missing} feature(s); a classification dataset has 'text' (or 'text_a' "
            f"and 'text_b') and a ClassLabel 'label' (e.g. bible_paraphrase, tsv_classify)."
        )
    return names


class Tokenize:
    """An example's text(s) -> per-token ids, token types and label, at most `max_length` tokens.

    A pair longer than the row is trimmed from its longer text first (BERT's rule), so both keep
    words; trims are counted in `stats`. No example is dropped (eval keeps predictions aligned).
    """

    def __init__(self, sp, texts: list[str], max_length: int, stats: TokenizeStats | None = None):
        self.sp, self.texts, self.max_length = sp, list(texts), max_length
        self.keys = {"targets": "ids", "token_types": "types", "labels": LABEL}  # output names (packing)
        self.stats = stats if stats is not None else TokenizeStats()
        self.cls, self.sep = special_ids(sp)
        is_byte = getattr(sp, "is_byte", None)
        size = sp.get_piece_size() if hasattr(sp, "get_piece_size") else 0
        self._byte_ids = np.array([is_byte(i) for i in range(size)]) if is_byte and size else None

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, token types) of one example's texts in the `[CLS] a [SEP] b [SEP]` layout."""
        pieces = [list(self.sp.encode(t)) for t in texts]
        if self._byte_ids is not None:
            self.stats.byte_fallback_tokens += sum(int(self._byte_ids[p].sum()) for p in pieces if p)
        budget = self.max_length - len(pieces) - (self.cls is not None)
        if sum(map(len, pieces)) > budget:
            self.stats.trimmed += 1
            while sum(map(len, pieces)) > budget:
                longest = max(range(len(pieces)), key=lambda i: len(pieces[i]))
                pieces[longest] = pieces[longest][: len(pieces[longest]) - 1]
        ids, types = [] if self.cls is None else [self.cls], [] if self.cls is None else [0]
        for kind, p in enumerate(pieces):
            ids += p + [self.sep]
            types += [kind] * (len(p) + 1)
        return np.asarray(ids, np.int32), np.asarray(types, np.int32)

    def __call__(self, example: dict) -> dict:
        self.stats.examples += 1
        texts = [text_of(example[f]) for f in self.texts]
        ids, types = self.encode(texts[:1] + [t for t in texts[1:] if t])  # "" second text: a single one
        label = np.full(len(ids), int(example.get(LABEL, 0)), np.int32)
        return {"targets": ids, "token_types": types, "labels": label}

    def keep(self, example: dict) -> bool:
        return True


class NextSentencePairs:
    """A source of single texts -> BERT's next-sentence pairs: text b is the text after text a in
    the corpus and in the same document (label 1) or, half the time, a random other one (label 0).

    The corpus order is the examples' `key` feature where they have one ("book:chapter:verse" in
    bible_lm, whose prepared splits are stored shuffled by key hash; the book is the document, so
    a book's last verse is never followed), else the source's own order (one document). Each index
    draws its coin and partner from (seed, index) alone, so the pairs are the same whatever order or
    host reads them (resumable, like the source).
    """

    def __init__(self, source, seed: int = 0, feature: str = "text"):
        if len(source) < 3:
            raise ValueError(f"next-sentence pairs need at least 3 texts in the split; it has {len(source)}.")
        self.source, self.seed, self.feature = source, seed, feature
        self.next_of = next_in_corpus(source)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        n, index = len(self.source), int(index)
        rng = np.random.default_rng((self.seed, index))
        following = int(self.next_of[index])
        is_next = bool(rng.random() < 0.5) and following >= 0
        partner = following
        while not is_next and partner in (index, following):
            partner = int(rng.integers(n))
        text = lambda i: text_of(self.source[i][self.feature])  # noqa: E731
        return {"text_a": text(index), "text_b": text(partner), LABEL: int(is_next)}


def next_in_corpus(source) -> np.ndarray:
    """[N] int: the index of each example's next one in corpus order and the same document, or -1
    (see NextSentencePairs: by the `key` feature "document:...:..." if there is one, else in order)."""
    n = len(source)
    following = np.append(np.arange(1, n), -1)
    if "key" not in source[0]:
        return following
    if hasattr(source, "texts"):  # a prepared split: its raw records, several times faster
        keys = [k for (k,) in source.texts(0, n, ["key"])]
    else:
        keys = [text_of(source[i]["key"]) for i in range(n)]
    parsed = [tuple(int(p) for p in k.split(":")) for k in keys]
    order = sorted(range(n), key=parsed.__getitem__)
    following[:] = -1
    for a, b in zip(order, order[1:], strict=False):
        if parsed[a][0] == parsed[b][0]:
            following[a] = b
    return following


# ------------------------------------------------------------------------------ forward passes


def pooling_of(model) -> str:
    """The model's pooling rule, "auto" resolved: last real token for DecoderOnly, else first."""
    how = model.config.pooling
    return ("last" if isinstance(model, DecoderOnly) else "first") if how == "auto" else how


def _apply(model, params, batch, pool, rng=None, method_init=False):
    """Class logits [B, S, C] of a batch's rows under `pool` (or init variables if method_init)."""
    kwargs = dict(segment_ids=batch["targets_segment_ids"], positions=batch["targets_positions"])
    if isinstance(model, DecoderOnly):
        args = (batch["targets"], pool)
        kwargs["method"] = "classify"
    else:
        args = (batch["targets"],)
        kwargs.update(token_types=batch["token_types"], pool=pool)
    if method_init:
        return model.init(rng, *args, **kwargs)
    out = model.apply({"params": params}, *args, rngs={"dropout": rng}, **kwargs)
    return out if isinstance(model, DecoderOnly) else out[1]


def classify_forward(model, params, batch, rng, decoder_inputs=None):
    """(logits [B, S, C], labels [B, S], weights [B, S]): one prediction per (packed) sequence."""
    del decoder_inputs
    segments, s = batch["targets_segment_ids"], model.config.max_segments
    pool = pooling.pooling_weights(segments, pooling_of(model), s)
    logits = _apply(model, params, batch, pool, rng)
    labels = pooling.segment_values(batch["labels"], segments, s)
    return logits, labels, pooling.present_segments(segments, s)


def classify_init(model, rng, batch):
    """Variables of a classifier (DecoderOnly's head exists only through `classify`)."""
    pool = pooling.pooling_weights(batch["targets_segment_ids"], "first", model.config.max_segments)
    return _apply(model, None, batch, pool, rng, method_init=True)


def masked_lm_and_next_sentence(model, params, batch, inputs, masked, rng):
    """BERT's pretraining on next-sentence pairs: masked LM plus "is b the text after a?".

    `inputs` [B, T] are the batch's targets corrupted by `ops.mlm_mask` and `masked` [B, T] its
    weights (tasks' MLM forward makes both; [CLS] and [SEP] are never selected). Both objectives go
    through the one token loss of the train step: the [B, S, 2] pair logits are padded to the
    vocabulary with -1e9 (probability 0) and appended to the [B, T, V] token logits; each pair is
    weighted (masked tokens / pairs) so the two objectives' means count equally, as BERT adds them.
    """
    targets, segments = batch["targets"], batch["targets_segment_ids"]
    s = model.config.max_segments
    pool = pooling.pooling_weights(segments, "first", s)
    mlm_logits, pair_logits = model.apply(
        {"params": params}, inputs, segment_ids=segments,
        positions=batch["targets_positions"], token_types=batch["token_types"], pool=pool,
        rngs={"dropout": rng},
    )  # fmt: skip
    vocab, classes = mlm_logits.shape[-1], pair_logits.shape[-1]
    pair_logits = jnp.pad(pair_logits.astype(jnp.float32), ((0, 0), (0, 0), (0, vocab - classes)),
                          constant_values=-1e9).astype(mlm_logits.dtype)  # fmt: skip
    present = pooling.present_segments(segments, s)
    scale = jax.lax.stop_gradient(jnp.sum(masked) / jnp.maximum(jnp.sum(present), 1.0))
    labels = pooling.segment_values(batch["labels"], segments, s)
    return (
        jnp.concatenate([mlm_logits, pair_logits], axis=1),
        jnp.concatenate([targets, labels.astype(targets.dtype)], axis=1),
        jnp.concatenate([masked, present * scale], axis=1),
    )


def probabilities(model, params, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(class probabilities [B, S, C] float32, labels [B, S], present [B, S]) of a batch (eval)."""
    logits, labels, present = classify_forward(model, params, batch, jax.random.key(0))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), labels, present


# ------------------------------------------------------------------------------ optimizer, metrics


def freeze_body(
    tx: optax.GradientTransformation, new: frozenset[str] = frozenset()
) -> optax.GradientTransformation:
    """`tx` on the head's params (HEAD_PARAMS) and on `new` ("encoder/token_types/embedding", ...:
    the body's params the pretrained model lacked, freshly initialised, so trained); the pretrained
    body's updates are zero (frozen)."""

    def labels(params):
        def label(path, _):
            top = getattr(path[0], "key", None)
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return "head" if top in HEAD_PARAMS or name in new else "body"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"head": tx, "body": optax.set_to_zero()}, labels)


def scores(labels, predictions, num_classes: int) -> dict:
    """Accuracy and F1: of class 1 for two classes (binary), else the unweighted mean over the
    classes that occur as labels or predictions (macro), scikit-learn's definitions (F1 = 0 where
    a class is never predicted correctly, zero_division=0)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.size == 0:
        raise ValueError("no examples to score; pick a non-empty split.")
    f1 = {}
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (labels == c))
        fp, fn = np.sum((predictions == c) & (labels != c)), np.sum((predictions != c) & (labels == c))
        f1[c] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None  # None: the class never occurs
    seen = [v for v in f1.values() if v is not None]
    return {
        "accuracy": float(np.mean(labels == predictions)),
        "f1": float((f1[1] or 0.0) if num_classes == 2 else np.mean(seen)),
        "f1_kind": "binary (class 1)" if num_classes == 2 else "macro",
    }


# ------------------------------------------------------------------------------ experiment wiring


def dataset_labels(name: str, data_dir: str, **builder_kwargs) -> tuple[dict, tuple[str, ...]]:
    """({feature: feature} of the text features, class names) of a classification dataset.

    Ours are prepared first if needed: tsv_classify learns its class names from the files.
    """
    from flaxformer_lite.data.datasets import sources

    try:
        sources.open_source(name, "train", data_dir, **builder_kwargs)  # prepares ours on first use
    except ValueError as e:
        if "has no split" not in str(e) and "is empty" not in str(e):
            raise
    features = sources._builder(name, data_dir, **builder_kwargs).info.features
    texts = text_features(features)
    names = tuple(getattr(features[LABEL], "names", None) or ())
    if len(names) < 2:
        raise ValueError(
            f"dataset {name!r} has {len(names)} class(es) in its 'label' feature; a classifier needs 2 "
            "or more."
        )
    return {t: t for t in texts}, names


def with_classes(config, num_classes: int):
    """The config with model.overrides.num_classes set to the dataset's (saved with checkpoints)."""
    set_ = config.model.overrides.get("num_classes")
    if set_ not in (None, num_classes):
        raise ValueError(
            f"bad config: model.overrides.num_classes={set_} but the dataset {config.dataset_name!r} has "
            f"{num_classes} classes; drop the override (it is read from the dataset)."
        )
    config = config.copy_and_resolve_references()
    config.model.overrides.num_classes = num_classes
    return config
