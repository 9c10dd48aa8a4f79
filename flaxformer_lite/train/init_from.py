"""Start a run from another run of ours (`config.init_from=WORKDIR`) or a transformers import with a
new head: the pretrained body's params are copied, the classifier is new.

Fine-tuning reads text the way pretraining did, so the pretrained workdir's tokenizer is copied
into the new workdir (a different one there is an error); the body must have the same
architecture (checked field by field against the config saved with the checkpoint, then shape
by shape), or the copied weights would compute something else.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging

from flaxformer_lite import files

NEW_HEADS = ("classifier",)  # never copied: the task's own output layer (its classes are new)
# Fields that may differ between a pretrained body and the model it starts: how it runs, the head.
HEAD_FIELDS = ("num_classes", "pooling", "max_segments")


def _newest_step(workdir: str, missing: str = "") -> int:
    """The newest checkpoint step of `workdir`; none is FileNotFoundError(`missing`, or init_from's)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
    if not steps:
        default = (
            f"init_from={workdir!r} holds no checkpoints; point it at the workdir of a finished train.py run."
        )
        raise FileNotFoundError(missing or default)
    return steps[-1]


def saved_config(workdir: str, missing: str = "") -> dict | None:
    """The config saved with `workdir`'s newest checkpoint (None if it has none), for runs that
    start from or decode with another run of ours."""
    from flaxformer_lite.train import checkpoint

    step = _newest_step(workdir, missing)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, async_save=False)
    try:
        return ckpt.saved_config(step)
    finally:
        ckpt.close()


def adopt_tokenizer(init_from: str, workdir: str):
    """The pretrained workdir's spm.model, copied into `workdir` (eval.py and generate.py read it there)."""
    from flaxformer_lite.data.tokenizer import load_sentencepiece

    theirs, ours = os.path.join(init_from, "spm.model"), os.path.join(workdir, "spm.model")
    if not os.path.isfile(theirs):
        if os.path.isfile(ours):  # the pretrained run is gone: the copy made when fine-tuning began
            return load_sentencepiece(ours)
        raise FileNotFoundError(
            f"init_from={init_from!r} has no spm.model; is it the workdir of a train.py run?"
        )
    if os.path.isfile(ours) and not filecmp.cmp(theirs, ours, shallow=False):
        raise ValueError(
            f"bad config: {ours!r} is another vocabulary than the pretrained {theirs!r}; start a new "
            "--workdir "
            "(fine-tuning copies the pretrained tokenizer)."
        )
    if not os.path.isfile(ours):
        os.makedirs(workdir, exist_ok=True)
        for suffix in ("", ".options.json"):
            if os.path.isfile(theirs + suffix):
                shutil.copyfile(theirs + suffix, ours + suffix)
    return load_sentencepiece(ours)


def check_architecture(init_from: str, model_cfg, family: str) -> None:
    """One-line error naming the ModelConfig fields where the pretrained body differs from ours."""
    from flaxformer_lite.train.run_config import NOT_ARCHITECTURE, differences, model_config

    saved = saved_config(init_from)
    if not saved or "model" not in saved:
        return
    theirs = model_config(ml_collections.ConfigDict(saved), model_cfg.vocab_size)
    unused = {
        "EncoderOnly": ("num_decoder_layers",),
        "DecoderOnly": ("num_encoder_layers", "type_vocab_size"),
    }
    skip = set(NOT_ARCHITECTURE) | set(HEAD_FIELDS) | set(unused.get(family, ()))
    differ = [
        f"{name}={was!r} there but {now!r} here" for name, was, now in differences(theirs, model_cfg, skip)
    ]
    if differ:
        raise ValueError(
            f"bad config: init_from={init_from!r} holds another model: {'; '.join(differ)}. Use its model "
            "settings (--config.model.preset / --config.model.overrides.*)."
        )


def new_params(config, workdir: str | None, names) -> tuple[str, ...]:
    """Of our model's flat param `names`, those the pretrained source (init_from or init_from_hf)
    lacks: freshly initialised when fine-tuning starts, so trained even with freeze_body. Saved in
    <workdir>/init_from.new_params.json the first time, so a resumed run builds the same optimizer
    even when the source has gone since; () without a source."""
    saved = os.path.join(workdir, "init_from.new_params.json") if workdir else None
    if saved and os.path.isfile(saved):
        return tuple(files.read_json(saved, "delete it and rerun (it is written again from init_from)"))
    if config.init_from:
        step = _newest_step(config.init_from)
        folder = os.path.join(os.path.abspath(config.init_from), "checkpoints", str(step))
        import orbax.checkpoint as ocp

        meta = ocp.StandardCheckpointer().metadata(os.path.join(folder, "params"))
        meta = getattr(meta, "item_metadata", meta)  # a tree of array metadata (not a dict)
        theirs = {"/".join(map(str, path)) for path in _paths(meta)}
        if not theirs:  # unreadable metadata must not unfreeze the whole body
            raise ValueError(
                f"cannot read the parameter names of {folder}/params (init_from); is it complete?"
            )
    elif config.init_from_hf:
        from flaxformer_lite.interop import hf

        theirs = set(hf.param_names(config.init_from_hf))
    else:
        return ()
    new = tuple(sorted(n for n in names if n not in theirs))
    if saved and jax.process_index() == 0:
        with open(saved, "w") as f:
            json.dump(list(new), f)
    return new


def read_params(init_from: str) -> tuple[int, dict]:
    """(step, params as numpy) of the newest checkpoint there: the moving average where it kept one."""
    import orbax.checkpoint as ocp

    step = _newest_step(init_from)
    folder = os.path.join(os.path.abspath(init_from), "checkpoints", str(step))
    path = os.path.join(folder, "ema" if os.path.isdir(os.path.join(folder, "ema")) else "params")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return step, jax.tree.map(np.asarray, ckptr.restore(path, target))


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    return {prefix[:-1]: tree}


def merge(loaded: dict, fresh, source: str):
    """`fresh` (a new model's params) with every parameter `loaded` has copied in, except NEW_HEADS.

    Returns (params, names of the new parameters). A parameter of another shape is a one-line
    error; one the pretrained model lacks (a new head, token types) stays freshly initialised.
    """
    have, new = _flat(loaded), []

    def pick(path, value):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.split("/")[0] in NEW_HEADS or name not in have:
            new.append(name)
            return np.asarray(value)
        if tuple(have[name].shape) != tuple(value.shape):
            raise ValueError(
                f"bad config: parameter {name!r} has shape {tuple(have[name].shape)} in {source} but "
                f"{tuple(value.shape)} here; use the pretrained model's sizes and vocabulary."
            )
        return have[name].astype(value.dtype)

    params = jax.tree_util.tree_map_with_path(pick, jax.device_get(fresh))
    unused = sorted(set(have) - {"/".join(map(str, k)) for k in _paths(params)})
    body_new = [n for n in new if n.split("/")[0] not in NEW_HEADS]
    if body_new and unused:  # e.g. layers stacked by scan_layers on one side only: nothing would load
        raise ValueError(
            f"bad config: the parameters of {source} do not line up with this model's ({len(body_new)} new, "
            f"e.g. {body_new[0]!r}; {len(unused)} unused, e.g. {unused[0]!r}); use the pretrained run's "
            "layout (the same scan_layers)."
        )
    logging.info("initialised from %s; new parameters: %s; not used: %s", source, new, unused)
    return params, new


def _paths(tree):
    return [
        tuple(getattr(k, "key", k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]
