"""Decoding given inputs for people: translations, continuations, n-best, alignments, plots."""
