"""prefetch.DevicePrefetch: batches in order, state of the last batch handed over, errors raised."""

import json

import grain
import numpy as np
import pytest

from flaxformer_lite.data import prefetch


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=0).to_iter_dataset().batch(4))


def test_batches_and_state_are_those_of_the_iterator_consumed_so_far():
    reference, feed = _iterator(), prefetch.DevicePrefetch(_iterator(), put=np.asarray, depth=3)
    for _ in range(5):
        np.testing.assert_array_equal(next(feed), next(reference))
    # The thread is ahead (depth 3), but the state is that of 5 batches: a resume goes on at the 6th.
    assert json.loads(feed.get_state()) == reference.get_state()
    resumed = prefetch.DevicePrefetch(_iterator(), put=np.asarray)
    resumed.set_state(feed.get_state())
    for _ in range(4):
        np.testing.assert_array_equal(next(resumed), next(reference))
    feed.close()
    resumed.close()


def test_an_error_in_the_thread_is_raised_by_next():
    def failing():
        yield np.zeros(2)
        raise OSError("shard unreadable")

    class It:
        def __init__(self):
            self.gen = failing()

        def __next__(self):
            return next(self.gen)

        def get_state(self):
            return {}

    feed = prefetch.DevicePrefetch(It())
    next(feed)
    for _ in range(2):
        with pytest.raises(OSError, match="shard unreadable"):
            next(feed)
    feed.close()
