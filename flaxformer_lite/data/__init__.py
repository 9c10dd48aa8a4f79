"""Corpora to batches: TFDS builders, SentencePiece, the token cache, packing, prefetch."""
