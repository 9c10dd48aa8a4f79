"""packing.PackedBatches against grain's own first-fit packer, and its exact resume."""

import grain
import numpy as np
import pytest

from flaxformer_lite.data import packing, token_cache
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.ids import EOS_ID


class WordIds:
    """A stand-in tokenizer: each space-separated word is its integer value (0 words: empty)."""

    def get_piece_size(self):
        return 1000

    def is_byte(self, i):
        return 4 <= i < 8  # some ids count as byte-fallback pieces

    def encode(self, texts):
        return [[int(w) for w in t.split()] for t in texts]


def _corpus(n, seed, features=("inputs", "targets"), max_words=40):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {}
        for f in features:
            k = int(rng.integers(0, max_words)) if i % 17 else 0  # every 17th example is empty
            row[f] = " ".join(str(x) for x in rng.integers(3, 1000, k))
        rows.append(row)
    return rows


class ListSource(list):
    def __getitems__(self, keys):
        return [self[k] for k in keys]


@pytest.fixture
def cache(tmp_path):
    rows = ListSource(_corpus(300, 0))
    features = {"inputs": "inputs", "targets": "targets"}
    token_cache.build(rows, WordIds(), features, str(tmp_path / "c"))
    return token_cache.TokenSource(str(tmp_path / "c")), rows


def _grain_batches(cache, order, *, batch_size, max_length, max_segments, count):
    """The same example stream through grain's FirstFitPackIterDataset (the reference)."""
    tokenize = ip.FromCache(cache, max_length)
    ds = grain.MapDataset.range(10**9).map(lambda j: cache[order[j]]).map(tokenize).filter(tokenize.keep)
    it = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(),
        length_struct={n: max_length for n in cache.names},
        num_packing_bins=batch_size,
        shuffle_bins=False,
        max_sequences_per_bin=max_segments,
    ).batch(batch_size)
    it = iter(it)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("max_length,max_segments", [(16, None), (32, 3), (64, 5)])
def test_batches_equal_grains_first_fit_packer(cache, max_length, max_segments):
    cache, _ = cache
    order = packing.EpochOrder(len(cache), seed=3, shuffle=True, rows=8)
    ours = iter(
        packing.PackedBatches(cache, order, batch_size=8, max_length=max_length, max_segments=max_segments)
    )
    reference = _grain_batches(
        cache, order, batch_size=8, max_length=max_length, max_segments=max_segments, count=40
    )  # 40 batches cross at least one epoch boundary at these lengths
    for want in reference:
        got = next(ours)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_ids_are_the_tokenizers_trimmed_with_eos(cache):
    cache, rows = cache
    order = packing.EpochOrder(len(cache), seed=0, shuffle=False, rows=4)
    batch = next(iter(packing.PackedBatches(cache, order, batch_size=4, max_length=12)))
    seen = 0
    for row in range(4):
        for seg in range(1, batch["targets_segment_ids"][row].max() + 1):
            got = batch["targets"][row][batch["targets_segment_ids"][row] == seg]
            while not rows[seen]["inputs"] or not rows[seen]["targets"]:
                seen += 1  # empty examples are skipped
            want = [int(w) for w in rows[seen]["targets"].split()][:11] + [EOS_ID]
            assert got.tolist() == want
            positions = batch["targets_positions"][row][batch["targets_segment_ids"][row] == seg]
            assert positions.tolist() == list(range(len(want)))
            seen += 1


def test_resume_from_state_gives_the_same_batches(cache):
    cache, _ = cache
    order = packing.EpochOrder(len(cache), seed=1, shuffle=True, rows=8)
    ds = packing.PackedBatches(cache, order, batch_size=8, max_length=32, max_segments=4)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(30)]
    resumed = iter(packing.PackedBatches(cache, order, batch_size=8, max_length=32, max_segments=4))
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])


def test_epoch_order_is_a_permutation_per_epoch_and_hosts_partition_the_stream():
    n, rows, hosts = 23, 3, 2
    single = packing.EpochOrder(n, seed=5, shuffle=True, rows=rows * hosts)
    stream = [single[j] for j in range(3 * n)]
    for epoch in range(2):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # reshuffled every epoch
    per_host = [
        packing.EpochOrder(n, seed=5, shuffle=True, rows=rows, shard_index=i, shard_count=hosts)
        for i in range(2)
    ]
    for block in range(5):  # global block b = host 0's rows, then host 1's
        merged = [per_host[h][block * rows + r] for h in range(hosts) for r in range(rows)]
        assert merged == stream[block * rows * hosts : (block + 1) * rows * hosts]


def test_worker_slices_cover_the_stream():
    order = packing.EpochOrder(50, seed=2, shuffle=True, rows=4)
    whole = [order[j] for j in range(60)]
    parts = []
    for w in range(3):
        sliced = packing.EpochOrder(50, seed=2, shuffle=True, rows=4)
        sliced.offset, sliced.step = w, 3
        parts.append([sliced[k] for k in range(20)])
    assert [parts[j % 3][j // 3] for j in range(60)] == whole


def test_a_split_with_only_empty_examples_is_an_error(tmp_path):
    rows = ListSource([{"text": ""}] * 5)
    token_cache.build(rows, WordIds(), {"targets": "text"}, str(tmp_path / "e"))
    cache = token_cache.TokenSource(str(tmp_path / "e"))
    with pytest.raises(ip.NoUsableExample, match="none survives tokenization"):
        ip.FromCache(cache, 16, split="train")
