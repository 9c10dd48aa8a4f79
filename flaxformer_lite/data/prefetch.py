"""Train batches made ahead on a background thread and placed on the devices while the step runs."""

from __future__ import annotations

import json
import queue
import threading
import time


class DevicePrefetch:
    """An iterator of device batches, `depth` ahead of the training loop, with exact resume.

    A thread draws host batches from `iterator` (a grain iterator), records the iterator's state
    after each, and `put`s the batch on the devices (`sharding.global_batch`). `next()` hands them
    over in order and adds the time it blocked to `wait_s`: the training loop's wait for data.

    `get_state()` is the state after the last batch *handed over*, not after the ones made ahead,
    so a checkpoint resumes with exactly the batch after the last one trained on. It is JSON bytes,
    which grain's orbax `CheckpointHandler` writes as it is (the same file a grain iterator's state
    makes), and `set_state` reads it back before the thread starts (at the first `next()`). An error
    in the thread (an unreadable shard, a split with nothing usable) is raised by the `next()` that
    would have returned its batch.
    """

    def __init__(self, iterator, put=lambda batch: batch, depth: int = 2):
        self.iterator, self.put = iterator, put
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.state = iterator.get_state()
        self.wait_s = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start_prefetch(self) -> None:
        """Nothing until the first `next()`: a restore that fails after `set_state` (a damaged step)
        may be followed by `set_state` from an older step."""

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self.iterator)
                item = (self.put(batch), self.iterator.get_state(), None)
                while not self._stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            self.queue.put((None, None, e))

    def __iter__(self):
        return self

    def __next__(self):
        self._start()
        start = time.perf_counter()
        batch, state, error = self.queue.get()
        self.wait_s += time.perf_counter() - start
        if error is not None:
            self.queue.put((None, None, error))  # every later next() fails the same way
            raise error
        self.state = state
        return batch

    def take_wait(self) -> float:
        """Seconds `next()` blocked since the last call."""
        waited, self.wait_s = self.wait_s, 0.0
        return waited

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        if self._thread is not None:
            raise RuntimeError("set_state after the prefetch thread started")
        self.state = json.loads(state)
        self.iterator.set_state(self.state)

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making) and the iterator's workers."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self.queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
        if hasattr(self.iterator, "close"):
            self.iterator.close()
