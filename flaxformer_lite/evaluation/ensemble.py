"""Ensembles: several trained workdirs of one vocabulary, decoded together (see `decoding.steps`).

Each member keeps its own architecture (read from the config saved with its checkpoint, so the
sizes may differ); the data, task and lengths are the main run's.
"""

from __future__ import annotations

import filecmp
import os

import ml_collections

from flaxformer_lite.train import experiment, init_from


class VocabularyMismatch(ValueError):
    """Ensemble members must share one tokenizer: their log-probs are averaged id by id."""


def member_config(config, workdir: str):
    """`config` with the model (preset and overrides) saved with `workdir`'s newest checkpoint."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    missing = f"no checkpoints in {ckpt_dir!r}: an ensemble member must be a trained workdir."
    saved = init_from.saved_config(workdir, missing)
    config = config.copy_and_resolve_references()
    if saved and "model" in saved:
        config.model = ml_collections.ConfigDict(saved["model"])
    return config


def load(exp, workdirs: list[str], *, checkpoint: str = "last", weights: str = "auto"):
    """(models, params) of the ensemble members in `workdirs`, after checking their vocabulary
    against the main experiment's (the same spm.model file)."""
    models, params = [], []
    main_spm = os.path.join(exp.workdir, "spm.model")
    for workdir in workdirs:
        spm = os.path.join(workdir, "spm.model")
        if not os.path.exists(spm):
            raise FileNotFoundError(f"ensemble member {workdir!r} has no spm.model: pass a trained workdir.")
        if not filecmp.cmp(spm, main_spm, shallow=False):
            raise VocabularyMismatch(
                f"ensemble member {workdir!r} has another vocabulary than {exp.workdir!r} (their spm.model "
                "files differ); ensembles need models trained with one tokenizer (copy it before training)."
            )
        member = experiment.build(member_config(exp.config, workdir), workdir, tokenizer="load")
        _, p = member.restore_params(checkpoint=checkpoint, weights=weights)
        models.append(member.inference_model)
        params.append(p)
    return models, params
