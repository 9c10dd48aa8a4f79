"""BERT's masked-LM corruption (Devlin et al. 2019, section 3.1 and appendix C.2) as a pure function."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def mlm_mask(
    rng: Array,
    ids: Int[Array, "*B T"],
    *,
    vocab_size: int,
    special_ids: Sequence[int],
    mask_id: int,
    eligible: Bool[Array, "*B T"] | None = None,
    rate: float = 0.15,
    replace: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[Int[Array, "*B T"], Float[Array, "*B T"]]:
    """(model inputs [*B, T], loss weights [*B, T] float32): BERT's corruption of token `ids`.

    Each token that is `eligible` (e.g. segment_ids > 0: not padding) and not one of `special_ids`
    is selected independently with probability `rate` (as transformers' DataCollatorForLanguageModeling;
    BERT's own data script selects round(rate * n) per sequence). A selected token becomes `mask_id`
    with probability replace[0], a uniformly drawn id of [0, vocab_size) outside `special_ids` and
    `mask_id` with replace[1], and stays itself with replace[2] (so a model fine-tuned without masks
    does not meet inputs unlike its pretraining). The weights are 1 on the selected tokens and 0
    elsewhere: the loss predicts the original `ids` there only.
    """
    specials = sorted({int(i) for i in special_ids} | {int(mask_id)})
    if not 0 < rate <= 1:
        raise ValueError(f"mlm_mask: rate={rate} must be in (0, 1]; BERT's is 0.15.")
    if len(replace) != 3 or min(replace) < 0 or abs(sum(replace) - 1) > 1e-6:
        raise ValueError(
            f"mlm_mask: replace={replace} must be 3 probabilities (mask, random, keep) summing to 1."
        )
    if specials[0] < 0 or specials[-1] >= vocab_size or len(specials) >= vocab_size:
        raise ValueError(
            f"mlm_mask: special ids {specials} must be ids of a larger vocabulary than {vocab_size}."
        )
    select_rng, kind_rng, token_rng = jax.random.split(rng, 3)
    selected = jax.random.bernoulli(select_rng, rate, ids.shape)
    for s in specials:
        selected &= ids != s
    if eligible is not None:
        selected &= eligible
    u = jax.random.uniform(kind_rng, ids.shape)
    random_ids = jax.random.randint(token_rng, ids.shape, 0, vocab_size - len(specials), ids.dtype)
    for s in specials:  # ascending: the k-th draw becomes the k-th id that is not special
        random_ids += (random_ids >= s).astype(ids.dtype)
    corrupted = jnp.where(u < replace[0], jnp.asarray(mask_id, ids.dtype), ids)
    corrupted = jnp.where((u >= replace[0]) & (u < replace[0] + replace[1]), random_ids, corrupted)
    return jnp.where(selected, corrupted, ids), selected.astype(jnp.float32)
