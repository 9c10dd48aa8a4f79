"""BERT's masked-LM recipe (issue 41): `ops.mlm_mask` measured against the paper's numbers over many
draws (binomial bounds), the MLM and MLM + next-sentence forwards' loss only on the selected tokens,
next-sentence pairs inside a split, and a tiny MLM learning a toy language whose masked tokens are
implied by their neighbours."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lite import ops, tasks
from flaxformer_lite.config import tiny
from flaxformer_lite.data import datasets
from flaxformer_lite.data.datasets.bible import read_versions, split_of_book
from flaxformer_lite.ids import MASK_ID
from flaxformer_lite.model.models import EncoderOnly
from flaxformer_lite.tasks import classification
from tests import tiny_config


def _within(count, n, p, sigmas=5.0):
    """Whether `count` successes of `n` draws are within `sigmas` binomial deviations of n * p."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1e-9


# (vocabulary, special ids, mask id): ours (0 pad, 1 EOS, 2 unknown, 3 mask), and ids scattered
# through the vocabulary, as a transformers vocabulary has them
LAYOUTS = [(13, (0, 1, 2, 3), 3), (17, (0, 5, 16), 9)]


@pytest.mark.parametrize("vocab,special,mask_id", LAYOUTS)
def test_selection_and_the_80_10_10_split_match_bert_within_binomial_bounds(vocab, special, mask_id):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (4000, 37)).astype(np.int32)  # 148k tokens, specials among them
    lengths = rng.integers(1, 38, 4000)
    eligible = np.arange(37)[None, :] < lengths[:, None]  # the rest is padding
    inputs, weights = ops.mlm_mask(
        jax.random.key(1), jnp.asarray(ids), vocab_size=vocab, special_ids=special, mask_id=mask_id,
        eligible=jnp.asarray(eligible),
    )  # fmt: skip
    inputs, weights = np.asarray(inputs), np.asarray(weights)
    specials = np.array(sorted({*special, mask_id}))
    words = eligible & ~np.isin(ids, specials)
    selected = weights == 1
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert not np.any(selected & ~words)  # padding and special tokens are never selected ...
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])  # ... nor changed
    n_sel = int(selected.sum())
    assert _within(n_sel, int(words.sum()), 0.15)

    # Of the selected: 80% <mask>; 10% a random non-special id, which is the original itself with
    # probability 1 / (number of non-special ids); 10% kept.
    others = vocab - len(specials)
    is_mask = inputs[selected] == mask_id
    kept = inputs[selected] == ids[selected]
    random = ~is_mask & ~kept
    assert _within(int(is_mask.sum()), n_sel, 0.8)
    assert _within(int(kept.sum()), n_sel, 0.1 + 0.1 / others)
    assert _within(int(random.sum()), n_sel, 0.1 * (others - 1) / others)
    drawn = inputs[selected][random]
    assert not np.any(np.isin(drawn, specials))
    counts = np.bincount(drawn, minlength=vocab)[~np.isin(np.arange(vocab), specials)]
    assert all(_within(int(c), len(drawn), 1 / others) for c in counts)  # uniform over the others


def test_draws_differ_by_key_and_repeat_for_the_same_key():
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 50, (8, 64)), jnp.int32)
    draw = lambda k: ops.mlm_mask(jax.random.key(k), ids, vocab_size=50, special_ids=(0, 1, 2), mask_id=3)  # noqa: E731
    np.testing.assert_array_equal(draw(5)[0], draw(5)[0])
    assert not np.array_equal(draw(5)[1], draw(6)[1])


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(rate=0.0), "rate=0.0"), (dict(replace=(0.8, 0.1, 0.2)), "summing to 1"),
     (dict(vocab_size=3), "larger vocabulary")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(kwargs, message):
    args = dict(vocab_size=50, special_ids=(0, 1), mask_id=3) | kwargs
    with pytest.raises(ValueError, match=message) as e:
        ops.mlm_mask(jax.random.key(0), jnp.zeros((2, 3), jnp.int32), **args)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ the task forwards


class _Recorder:
    """A stand-in model: remembers the token ids it was given and returns fixed random logits."""

    def __init__(self, logits, classes=2, max_segments=2):
        self.logits, self.seen = logits, []
        self.config = types.SimpleNamespace(vocab_size=logits.shape[-1], max_segments=max_segments)
        self.classes = classes

    def apply(self, variables, inputs, **kwargs):
        self.seen.append(np.asarray(inputs))
        if "pool" in kwargs:  # the encoder with its pooler: (token logits, [B, S, C] pair logits)
            b, s = inputs.shape[0], self.config.max_segments
            return self.logits, jnp.zeros((b, s, self.classes), self.logits.dtype)
        return self.logits, None


def _pair_batch(rng, rows=64, length=40, vocab=61):
    """Rows of one [CLS] a [SEP] b [SEP] pair (ids 0 and 1) then padding; words are ids 4..vocab-1."""
    batch = {k: np.zeros((rows, length), np.int32) for k in
             ("targets", "targets_segment_ids", "targets_positions", "token_types", "labels")}  # fmt: skip
    for r in range(rows):
        a, b = rng.integers(2, 15, 2)
        ids = [0, *rng.integers(4, vocab, a), 1, *rng.integers(4, vocab, b), 1]
        n = len(ids)
        batch["targets"][r, :n], batch["targets_segment_ids"][r, :n] = ids, 1
        batch["targets_positions"][r, :n] = np.arange(n)
        batch["token_types"][r, a + 2 : n], batch["labels"][r, :n] = 1, r % 2
    return batch


@pytest.mark.parametrize("next_sentence", [False, True])
def test_the_mlm_loss_is_only_on_the_selected_tokens(next_sentence):
    rng = np.random.default_rng(0)
    batch = _pair_batch(rng)
    if not next_sentence:
        del batch["labels"], batch["token_types"]
    targets, length = batch["targets"], batch["targets"].shape[1]
    model = _Recorder(jnp.asarray(rng.normal(size=(*targets.shape, 61)), jnp.float32))
    logits, labels, weights = tasks.MLM.forward(model, None, batch, jax.random.key(3))
    (inputs,) = model.seen
    w = np.asarray(weights)[:, :length]
    words = (batch["targets_segment_ids"] > 0) & (targets > 3)  # not [CLS], [SEP], padding
    assert not np.any((w > 0) & ~words) and np.all(w[inputs != targets] == 1)
    assert _within(int((w > 0).sum()), int(words.sum()), 0.15)
    np.testing.assert_array_equal(np.asarray(labels)[:, :length], targets)

    def mlm_loss(token_logits):
        all_logits = jnp.concatenate([token_logits, logits[:, length:]], axis=1)
        total, _, _, _ = ops.token_losses(all_logits, labels, weights)
        return total

    x = np.asarray(model.logits, np.float64)  # numpy reference: cross entropy summed where selected
    log_p = x - x.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0][w > 0].sum()
    pair_part = float(ops.token_losses(logits[:, length:], labels[:, length:], weights[:, length:])[0])
    np.testing.assert_allclose(float(mlm_loss(model.logits)) - pair_part, want, rtol=1e-5)
    grad = np.asarray(jax.grad(mlm_loss)(model.logits))
    np.testing.assert_array_equal(np.any(grad != 0, axis=-1), w > 0)  # no gradient elsewhere
    if next_sentence:  # and one pair prediction per row, its label the row's
        np.testing.assert_array_equal(np.asarray(labels)[:, length], np.arange(64) % 2)
        assert np.all(np.asarray(weights)[:, length] > 0) and np.all(np.asarray(weights)[:, length + 1] == 0)


# ------------------------------------------------------------------------------ next-sentence pairs


def test_next_sentence_pairs_are_the_next_verse_of_the_book_or_a_random_one_of_the_split(tmp_path):
    """On the prepared bible_lm (stored shuffled by key hash): label 1 exactly when text b is the verse
    after text a in the same book, every text of the pair from the split, labels balanced."""
    verses = read_versions(tiny_config.FIXTURE, ["4"])["4"]  # the reference: the fixture's own verses
    labels, followed = [], 0  # followed: pairs drawn for a verse that has a next one in its book
    for split in ("train", "validation", "test"):
        keys = [k for k in sorted(verses) if split_of_book(k[0]) == split and verses[k]]
        after = {verses[a]: verses[b] for a, b in zip(keys, keys[1:], strict=False) if a[0] == b[0]}
        followed += 4 * sum(a[0] == b[0] for a, b in zip(keys, keys[1:], strict=False))
        source = datasets.open_source("bible_lm", split, str(tmp_path), db_path=tiny_config.FIXTURE)
        texts = {verses[k] for k in keys}
        assert {source[i]["text"].decode() for i in range(len(source))} == texts
        for seed in range(4):
            pairs = classification.NextSentencePairs(source, seed=seed)
            for i in range(len(pairs)):
                p = pairs[i]
                assert p["text_a"] in texts and p["text_b"] in texts and p["text_a"] != p["text_b"]
                assert (p["label"] == 1) == (after.get(p["text_a"]) == p["text_b"]), p
                labels.append(p["label"])
    assert _within(sum(labels), followed, 0.5)  # a fair coin for each of them (4 x 378 here)


# ------------------------------------------------------------------------------ learning


def _counting_batch(rng, rows, length=12, first=4, span=23):
    """Rows counting up by one from a random start, cycling through ids first..first+span-1: every
    token is its left neighbour + 1 (mod span), so a masked one is implied by the tokens around it."""
    start = rng.integers(0, span, (rows, 1))
    ids = (first + (start + np.arange(length)) % span).astype(np.int32)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return {"targets": ids, "targets_segment_ids": np.ones_like(ids), "targets_positions": pos}


@pytest.mark.slow
def test_a_tiny_mlm_learns_a_language_whose_masked_tokens_its_neighbours_imply():
    cfg = tiny(vocab_size=4 + 23, d_model=64, d_ff=128, num_kv_heads=4, position="rope")  # relative offsets
    model = EncoderOnly(cfg)
    rng = np.random.default_rng(0)
    params = tasks.MLM.init(model, jax.random.key(0), _counting_batch(rng, 2))["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, batch, key):
        def loss(p):
            logits, targets, weights = tasks.MLM.forward(model, p, batch, key)
            total, _, _, denom = ops.token_losses(logits, targets, weights)
            return total / denom

        updates, opt = tx.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for i in range(400):
        params, opt = step(params, opt, _counting_batch(rng, 32), jax.random.key(i))
    test = _counting_batch(np.random.default_rng(1), 256)
    masked = np.random.default_rng(2).random(test["targets"].shape) < 0.15  # every selected one a <mask>
    inputs = np.where(masked, MASK_ID, test["targets"])
    logits, _ = model.apply({"params": params}, inputs, segment_ids=test["targets_segment_ids"],
                            positions=test["targets_positions"])  # fmt: skip
    predicted = np.asarray(jnp.argmax(logits, -1))
    assert masked.sum() > 400 and np.mean(predicted[masked] == test["targets"][masked]) >= 0.99
