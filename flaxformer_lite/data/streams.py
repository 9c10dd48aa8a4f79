"""Contiguous document streams for training with Transformer-XL memory (model/memory.py).

The split's documents (token-cache examples, each followed by EOS) are read in a seeded order,
reshuffled every epoch, and dealt to G = global batch rows: global row g reads the documents at
stream ordinals g, g + G, g + 2G, ... back to back, `max_length` tokens per batch, so row g of the
next batch continues row g of this one (and the model's memory of row g carries over). A document
is cut wherever a batch ends, never trimmed.

Each batch is {"targets", "decoder_inputs" (the token before each target, BOS = 0 at a document's
start, also across a batch boundary), "targets_segment_ids" (the document's ordinal + 1, distinct
for every document a row reads, so attention and memory reset at boundaries; 0 = padding, never
made here), "targets_positions" (the offset within the document)}, all [rows, max_length] int32.

The iterator's state is two integers per row (the ordinal of its document, the offset in it), so
`get_state`/`set_state` resume exactly. Host i of N reads global rows [i * rows, (i + 1) * rows).
"""

from __future__ import annotations

import grain
import numpy as np

from flaxformer_lite.ids import EOS_ID


class DocumentStreams(grain.IterDataset):
    """Endless [rows, max_length] batches of `cache`'s `feature` as contiguous streams (see above)."""

    def __init__(
        self, cache, *, rows: int, max_length: int, seed: int, feature: str = "targets",
        shard_index: int = 0, shard_count: int = 1,
    ):  # fmt: skip
        super().__init__()
        self.ids, self.offsets = cache.ids[feature], cache.offsets[feature]
        self.rows, self.max_length, self.seed = rows, max_length, seed
        self.first_row, self.global_rows = shard_index * rows, shard_count * rows
        self.documents = np.flatnonzero(np.diff(self.offsets) > 0)  # empty examples are skipped
        if not len(self.documents):
            raise ValueError("no document of the split survives tokenization (all are empty)")
        self._epoch, self._order = -1, None

    def document(self, ordinal: int) -> int:
        """The cache index of the stream's `ordinal`-th document (a seeded permutation per epoch)."""
        epoch, k = divmod(ordinal, len(self.documents))
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, self.documents[rng.permutation(len(self.documents))]
        return int(self._order[k])

    def __iter__(self) -> _StreamIterator:
        return _StreamIterator(self)

    def __str__(self) -> str:
        return f"DocumentStreams(rows={self.rows}, max_length={self.max_length})"


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, ds: DocumentStreams):
        super().__init__()
        self.ds = ds
        self.rows = [[ds.first_row + r, 0] for r in range(ds.rows)]  # per row: [ordinal, offset]

    def get_state(self) -> dict:
        return {"rows": [list(row) for row in self.rows]}

    def set_state(self, state: dict) -> None:
        rows = [[int(a), int(b)] for a, b in state["rows"]]
        if len(rows) != self.ds.rows:
            raise ValueError(f"a stream state of {len(rows)} rows cannot resume {self.ds.rows} rows")
        self.rows = rows

    def _tokens(self, ordinal: int) -> np.ndarray:
        """The ids of the stream's `ordinal`-th document followed by EOS."""
        i = self.ds.document(ordinal)
        lo, hi = self.ds.offsets[i], self.ds.offsets[i + 1]
        return np.append(self.ds.ids[lo:hi].astype(np.int32), np.int32(EOS_ID))

    def __next__(self) -> dict:
        ds, T = self.ds, self.ds.max_length
        out = {name: np.zeros((ds.rows, T), np.int32) for name in
               ("targets", "decoder_inputs", "targets_segment_ids", "targets_positions")}  # fmt: skip
        for r, row in enumerate(self.rows):
            filled = 0
            while filled < T:
                ordinal, offset = row
                tokens = self._tokens(ordinal)
                n = min(T - filled, len(tokens) - offset)
                cells = slice(filled, filled + n)
                out["targets"][r, cells] = tokens[offset : offset + n]
                previous = tokens[max(offset - 1, 0) : offset + n - 1]  # BOS (0) before the first
                out["decoder_inputs"][r, filled + n - len(previous) : filled + n] = previous
                out["targets_segment_ids"][r, cells] = ordinal + 1
                out["targets_positions"][r, cells] = np.arange(offset, offset + n)
                filled += n
                row[:] = [ordinal, offset + n] if offset + n < len(tokens) else [ordinal + ds.global_rows, 0]
        return out
