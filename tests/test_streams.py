"""data/streams.py: documents as contiguous row streams, against the streams written out by hand."""

import numpy as np
import pytest

from flaxformer_lite.data.streams import DocumentStreams
from flaxformer_lite.ids import EOS_ID

LENGTHS = [3, 0, 7, 2, 4, 5]  # ids per document; the empty one is skipped


class _Cache:
    """A token cache of documents whose ids are 100 * (index + 1) + offset (readable in failures)."""

    def __init__(self, lengths=LENGTHS):
        self.offsets = {"targets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
        self.ids = {"targets": np.concatenate([100 * (i + 1) + np.arange(n) for i, n in enumerate(lengths)])}


def _documents_in_order(seed, epochs):
    """The non-empty document indices, a seeded permutation per epoch (the module's stated order)."""
    kept = np.array([i for i, n in enumerate(LENGTHS) if n])
    return [
        int(kept[j]) for e in range(epochs) for j in np.random.default_rng([seed, e]).permutation(len(kept))
    ]


def _expected_row(g, G, seed, length):
    """Row g of G, by hand: its documents (ordinals g, g+G, ...) back to back, each ids + EOS."""
    order = _documents_in_order(seed, epochs=20)
    targets, inputs, doc_ids, positions = [], [], [], []
    ordinal = g
    while len(targets) < length:
        i = order[ordinal]
        tokens = [100 * (i + 1) + t for t in range(LENGTHS[i])] + [EOS_ID]
        targets += tokens
        inputs += [0] + tokens[:-1]
        doc_ids += [ordinal + 1] * len(tokens)
        positions += list(range(len(tokens)))
        ordinal += G
    return [np.array(x[:length]) for x in (targets, inputs, doc_ids, positions)]


def _read(it, batches):
    out = [next(it) for _ in range(batches)]
    return {k: np.concatenate([b[k] for b in out], axis=1) for k in out[0]}


@pytest.mark.parametrize("rows,length", [(2, 5), (3, 4)])
def test_rows_continue_their_documents_from_batch_to_batch(rows, length):
    got = _read(iter(DocumentStreams(_Cache(), rows=rows, max_length=length, seed=7)), batches=6)
    for g in range(rows):
        want = _expected_row(g, rows, 7, 6 * length)
        names = ("targets", "decoder_inputs", "targets_segment_ids", "targets_positions")
        for name, expected in zip(names, want, strict=True):
            np.testing.assert_array_equal(got[name][g], expected, err_msg=f"row {g} {name}")


def test_resume_from_a_saved_state_is_exact_and_the_state_is_two_integers_per_row():
    ds = DocumentStreams(_Cache(), rows=2, max_length=5, seed=3)
    it = iter(ds)
    _read(it, 3)
    state = it.get_state()
    assert np.asarray(state["rows"]).shape == (2, 2)
    want = _read(it, 4)
    resumed = iter(DocumentStreams(_Cache(), rows=2, max_length=5, seed=3))
    resumed.set_state(state)
    got = _read(resumed, 4)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(ValueError, match="cannot resume 3 rows"):
        iter(DocumentStreams(_Cache(), rows=3, max_length=5, seed=3)).set_state(state)


def test_hosts_read_their_rows_of_the_one_global_stream():
    whole = _read(iter(DocumentStreams(_Cache(), rows=4, max_length=3, seed=1)), 5)
    for host in range(2):
        part = _read(
            iter(DocumentStreams(_Cache(), rows=2, max_length=3, seed=1, shard_index=host, shard_count=2)), 5
        )
        for name in whole:
            np.testing.assert_array_equal(part[name], whole[name][2 * host : 2 * host + 2])
