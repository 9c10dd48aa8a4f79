"""Flax Linen layers and the three model families, and their FLOP counts."""
