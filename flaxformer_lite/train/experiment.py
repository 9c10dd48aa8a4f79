"""Build an experiment once from an ml_collections config: task, data, tokenizer, model, mesh, optimizer.

`build(config, workdir)` returns a frozen `Experiment`; train.py, eval.py, generate.py and the
benchmarks take it and never re-derive a path, a feature name or a model from the config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import sentencepiece as spm
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh

from flaxformer_lite import files, sharding, tasks
from flaxformer_lite.data import datasets, streams, token_cache
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.data.tokenizer import load_or_train, load_sentencepiece
from flaxformer_lite.model.models import variant
from flaxformer_lite.tasks import classification
from flaxformer_lite.train import checkpoint, init_from, runtime, selection, training
from flaxformer_lite.train.run_config import (  # noqa: F401  (re-exported: experiment.validate, ...)
    NOT_ARCHITECTURE,
    RESUMABLE_CHANGES,
    differences,
    make_optimizer,
    model_config,
    refuse_other_data,
    refused_resume,
    resume_changes,
    schedule_horizon,
    validate,
)


@dataclasses.dataclass(frozen=True)
class Data:
    """A TFDS dataset and the features the task reads from it (model input name -> feature)."""

    name: str
    data_dir: str
    builder_kwargs: dict
    keys: dict[str, str]
    labels: tuple[str, ...] = ()  # class names (classification tasks)

    @classmethod
    def from_config(cls, config, workdir: str, task: tasks.Task) -> Data:
        kwargs = {"manual_dir": config.manual_dir} if config.manual_dir else {}
        if config.db_path and config.dataset_name.startswith("bible_"):
            kwargs["db_path"] = config.db_path
        if config.corpus_fields:  # the columns of a jsonl/parquet/Arrow corpus (datasets/text_files.py)
            if config.dataset_name not in ("tsv_translate", "text_lm"):
                raise ValueError(
                    f"bad config: corpus_fields is read by tsv_translate and text_lm, not by "
                    f"{config.dataset_name!r}; leave it empty."
                )
            kwargs["fields"] = config.corpus_fields
        data_dir = datasets.prepared_dir(config.data_dir or datasets.default_data_dir(workdir), **kwargs)
        keys = {"targets": "text"}
        if task.paired:
            src, tgt = datasets.supervised_keys(
                config.dataset_name, data_dir, config.reverse_translation, **kwargs
            )
            keys = {"inputs": src, "targets": tgt}
        labels = ()
        if task.classifies:
            keys, labels = classification.dataset_labels(config.dataset_name, data_dir, **kwargs)
        return cls(config.dataset_name, data_dir, kwargs, keys, labels)

    @property
    def tag(self) -> str:
        """A file-name-safe name: the dataset, plus the source hash of a local corpus."""
        folder = os.path.basename(self.data_dir)
        suffix = folder[len("source") :] if folder.startswith("source-") else ""
        return self.name.replace("/", "-") + suffix

    def open(self, split: str):
        """A random-access source of `split` (the dataset is prepared on first use if it is ours)."""
        return datasets.open_source(self.name, split, self.data_dir, **self.builder_kwargs)

    def training_texts(self):
        """Every feature's text of the *train* split (for the tokenizer)."""
        return datasets.training_texts(self.open("train"), sorted(set(self.keys.values())))


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
    """Everything a run needs, built once: see `build`."""

    config: ml_collections.ConfigDict
    workdir: str | None
    task: tasks.Task
    data: Data | None  # None for synthetic benchmarks
    tokenizer: Any  # sentencepiece.SentencePieceProcessor, or None for synthetic benchmarks
    model: nn.Module
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    @property
    def host_batch_size(self) -> int:
        return self.config.batch_size // jax.process_count()

    @property
    def batch_shape(self) -> tuple[int, int]:
        return self.config.batch_size, self.config.max_length

    @property
    def inference_model(self) -> nn.Module:
        """The model without dropout (evaluation, decoding)."""
        return variant(self.model, deterministic=True)

    def tokenize(self, stats: ip.TokenizeStats | None = None, keys: dict | None = None) -> ip.Tokenize:
        if self.task.classifies or self.config.next_sentence:  # [CLS] a [SEP] b [SEP], label
            texts = list((keys or self.data.keys).values()) if self.task.classifies else ["text_a", "text_b"]
            return classification.Tokenize(self.tokenizer, texts, self.config.max_length, stats)
        return ip.Tokenize(self.tokenizer, keys or self.data.keys, self.config.max_length, stats)

    def train_dataset(self, stats: ip.TokenizeStats | None = None):
        """Endless, shuffled, packed (or padded) per-host batches of the train split: token ids from
        the workdir's token cache (built on first use) where the task reads text with spm.model."""
        split = self.config.train_split
        if self.model.config.memory_length:  # Transformer-XL: whole documents as contiguous row streams
            return streams.DocumentStreams(
                self.token_cache(split), rows=self.host_batch_size, max_length=self.config.max_length,
                seed=self.config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
            )  # fmt: skip
        cache = self._pieces(self.token_cache(split))
        if cache is None:
            return self._dataset(split, self.tokenize(stats), train=True)
        c, from_cache = self.config, ip.FromCache(cache, self.config.max_length, stats, split)
        if not c.pack:
            return self._dataset(split, from_cache, train=True, source=cache)
        return ip.make_packed_dataset(
            cache, batch_size=self.host_batch_size, max_length=c.max_length,
            max_segments=self.model.config.max_segments, seed=c.seed, shard_index=jax.process_index(),
            shard_count=jax.process_count(), workers=c.data_workers,
        )  # fmt: skip

    def _pieces(self, cache: token_cache.TokenSource | None):
        """With long_examples="split", the train cache cut into pieces of max_length (long documents)."""
        how = self.config.long_examples
        if how not in ("trim", "split"):
            raise ValueError(f"bad config: long_examples={how!r}; use 'trim' or 'split'.")
        if how == "trim":
            return cache
        if cache is None or not self.config.pack:
            raise ValueError(
                "bad config: long_examples='split' cuts the token cache's texts into packed pieces; "
                "set token_cache=True and pack=True (a language model), or long_examples='trim'."
            )
        return token_cache.Pieces(cache, self.config.max_length)

    def token_cache(self, split: str) -> token_cache.TokenSource | None:
        """The split's token ids (`<workdir>/tokens/`), or None where the task tokenizes on the fly
        (classification, next-sentence pairs, a transformers tokenizer, `token_cache=False`)."""
        c = self.config
        model_path = os.path.join(self.workdir or "", "spm.model")
        plain = isinstance(self.tokenizer, spm.SentencePieceProcessor) and os.path.isfile(model_path)
        if not (c.token_cache and plain and self.workdir) or self.task.classifies or c.next_sentence:
            return None
        source, cache_dir = self.data.open(split), os.path.join(self.workdir, "tokens")
        return runtime.process_zero_first(
            lambda: token_cache.open_or_build(
                source, self.tokenizer, model_path, self.data.keys, cache_dir, split
            ),
            key=f"tokens_ready_{split}",
        )

    def eval_dataset(self, split: str | None = None):
        """One pass over an eval split in order, unpacked, last batch padded with empty rows."""
        ds = self._dataset(split or self.config.eval_split, self.tokenize(), train=False)
        return ds.map(functools.partial(pad_rows, rows=self.host_batch_size))

    def _dataset(self, split: str, tokenize, *, train: bool, source=None):
        c = self.config
        source = source if source is not None else self.data.open(split)
        if c.next_sentence:  # BERT's next-sentence pairs of consecutive texts (MLM)
            source = classification.NextSentencePairs(source, c.seed, self.data.keys["targets"])
        return ip.make_dataset(
            source,
            tokenize,
            batch_size=self.host_batch_size,
            max_length=c.max_length,
            pack=c.pack and train,
            max_segments=self.model.config.max_segments,
            shuffle=train,
            seed=c.seed,
            num_epochs=None if train else 1,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            drop_remainder=train,
            split=split,
            workers=c.data_workers if train else 0,
        )

    @property
    def ema(self) -> bool:
        """Whether the train state keeps an exponential moving average of the params."""
        return bool(self.config.ema_decay)

    def init_state(self, rng: jax.Array):
        """(TrainState, shardings), initialised directly sharded on the mesh."""
        return training.create_train_state(
            self.model, self.tx, rng, self.task, self.batch_shape, self.mesh, ema=self.ema
        )

    def abstract_state(self):
        """(abstract TrainState, shardings): what `init_state` makes, with nothing allocated."""
        return training.state_shardings(
            self.model, self.tx, self.task, self.batch_shape, self.mesh, ema=self.ema
        )

    def train_step(self, shardings):
        """The jitted train step: state sharded as `shardings` (donated), batch over data x fsdp."""
        c = self.config
        sampling = None
        if c.scheduled_sampling_max_prob > 0:
            sampling = training.linear_ramp(c.scheduled_sampling_max_prob, c.scheduled_sampling_ramp_steps)
        step_fn = functools.partial(
            training.train_step,
            model=self.model,
            tx=self.tx,
            schedule=self.schedule,
            task=self.task,
            label_smoothing=c.label_smoothing,
            grad_accum_steps=c.grad_accum_steps,
            sampling_schedule=sampling,
            ema_decay=c.ema_decay,
            objective=self._objective(),
            load_balance=c.mesh_context if c.context_load_balance else 0,
        )
        with jax.set_mesh(self.mesh):
            return jax.jit(
                sharding.under_rules(step_fn),
                in_shardings=(shardings, sharding.batch_sharding(self.mesh), None),
                out_shardings=(shardings, None),
                donate_argnums=0,
            )

    def _objective(self):
        """The loss the train step minimises: None (token-level) or minimum risk (mrt.py)."""
        c = self.config
        if c.objective != "mrt":
            return None
        from flaxformer_lite.train import mrt

        options = dict(k=c.mrt_candidates, source=c.mrt_source, temperature=c.mrt_temperature,
                       alpha=c.mrt_alpha, mix=c.mrt_mix)  # fmt: skip
        return functools.partial(mrt.loss_sums, options=options)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.workdir, "checkpoints")

    def checkpointer(self, **kwargs) -> checkpoint.Checkpointer:
        c = self.config
        options = dict(save_every=c.checkpoint_every, keep=c.keep_checkpoints, async_save=c.async_checkpoints)
        key, mode = selection.metric(c) or ("", "max")
        options.update(keep_best=c.keep_best, metric=f"valid_{key}", mode=mode)
        directory = kwargs.pop("directory", self.checkpoint_dir)
        return checkpoint.Checkpointer(directory, **{**options, **kwargs})

    def imported_params(self, shardings, fresh=None):
        """The params of the `init_from_hf` checkpoint (or, with `init_from`, of a pretrained workdir of
        ours), placed as `shardings` (a matching tree). With `fresh` (the new model's initial params)
        for a classifier or `init_from`, only what both hold is copied in; the head stays new."""
        if self.config.init_from:
            family = self.task.model_class.__name__
            init_from.check_architecture(self.config.init_from, self.model.config, family)
            step, params = init_from.read_params(self.config.init_from)
            source = f"{self.config.init_from} (step {step})"
        else:
            from flaxformer_lite import interop

            _, params = interop.from_hf(self.config.init_from_hf)
            source = self.config.init_from_hf
        if fresh is not None and (self.task.classifies or self.config.init_from):
            params, _ = init_from.merge(params, fresh, source)
        dtype = self.model.config.param_dtype
        return jax.tree.map(lambda s, x: jax.device_put(np.asarray(x, dtype), s), shardings, params)

    def for_resume(self, saved: dict | None, step: int = 0) -> Experiment:
        """This experiment with its schedule horizon fixed, checked against the config saved with
        the checkpoint it resumes from (None: a fresh run).

        A change of what the run computes (model, data, optimizer, schedule, batch, seed...) is a
        one-line error; changes of RESUMABLE_CHANGES are logged. `schedule_steps` is set to the
        cosine horizon (`schedule_horizon`), so the config saved with later checkpoints keeps it.
        """
        config = self.config.copy_and_resolve_references()
        config.schedule_steps = schedule_horizon(saved, self.config)
        if saved:
            saved = {**saved, "schedule_steps": saved.get("schedule_steps") or saved.get("num_train_steps")}
            refused, allowed = resume_changes(saved, config)
            if refused:
                raise refused_resume(self.workdir, step, refused)
            if allowed:
                logging.info("resuming with changed run settings: %s", "; ".join(allowed))
        new = _new_params(config, self.workdir, self.model, self.task)
        tx, schedule = make_optimizer(config, self.model.config.d_model, new)
        return dataclasses.replace(self, config=config, tx=tx, schedule=schedule)

    def restore_params(self, step: int | None = None, *, checkpoint: str = "last", weights: str = "auto"):
        """(step, params) of a readable checkpoint; never reads optimizer state.

        checkpoint: "last" (the newest readable one), "best" (the best validation score kept:
        `valid_metric` / `keep_best`), "averaged" (what `python -m flaxformer_lite.tools.average` wrote) or
        a step number; `step` (an int) is the same as checkpoint=str(step). weights: "ema" (the
        params' moving average), "raw", or "auto" (the average where the run kept one).
        With `init_from_hf` and no checkpoint in the workdir: (0, the imported params).
        """
        checkpoint = str(step) if step is not None else checkpoint
        ckpt_dir = self.averaged_dir if checkpoint == "averaged" else self.checkpoint_dir
        has_checkpoints = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
        abstract = training.abstract_params(self.model, self.task, self.batch_shape, self.mesh)
        if self.config.init_from_hf and checkpoint == "last" and not has_checkpoints:
            return 0, self.imported_params(jax.tree.map(lambda a: a.sharding, abstract))
        if not has_checkpoints:  # checked first: opening a Checkpointer creates the directory
            hint = (
                "average first: python -m flaxformer_lite.tools.average"
                if checkpoint == "averaged"
                else "train first"
            )
            raise FileNotFoundError(f"no checkpoints in {ckpt_dir!r}; {hint} (--workdir={self.workdir}).")
        ckpt = self.checkpointer(save_every=1, directory=ckpt_dir)
        try:
            wanted = self._resolve(ckpt, checkpoint)
            item = _weights_item(weights)
            restored = ckpt.restore_params(abstract, step=wanted, item=item)
            if restored is not None:
                self._check_model_matches(ckpt.saved_config(restored[0]), restored[0])
        finally:
            ckpt.close()
        if restored is None:
            raise FileNotFoundError(f"{ckpt_dir!r} holds no checkpoint; train first with train.py.")
        return restored

    @property
    def averaged_dir(self) -> str:
        return os.path.join(self.workdir, "averaged")

    def _resolve(self, ckpt: checkpoint.Checkpointer, which: str) -> int | None:
        """The step that "last" / "averaged" (None: the newest readable), "best" or "<step>" names."""
        if which in ("last", "averaged"):
            return None
        if which == "best":
            best = ckpt.best_step()
            if best is None:
                raise FileNotFoundError(
                    f"no checkpoint in {ckpt.directory!r} carries a validation score ({ckpt.metric}); train "
                    "with --config.valid_metric=bleu (or loss, ...) and --config.keep_best=K."
                )
            return best
        if not which.isdigit():
            raise ValueError(f"--checkpoint={which!r}; use last, best, averaged or a step number")
        return int(which)

    def _check_model_matches(self, saved: dict | None, step: int) -> None:
        """Refuse params trained with other architecture fields (same shapes, other function)."""
        if not saved or "model" not in saved:
            return
        saved = ml_collections.ConfigDict(saved)
        theirs = model_config(saved, self.model.config.vocab_size)
        ours = self.model.config
        differ = [
            f"{name}={was!r} in the checkpoint but {now!r} here"
            for name, was, now in differences(theirs, ours, skip=NOT_ARCHITECTURE)
        ]
        if differ:
            raise checkpoint.CheckpointMismatchError(
                f"the checkpoint of step {step} in {self.workdir!r} was trained with another model: "
                + "; ".join(differ)
                + ". Use the config it was trained with (or set those --config.model.overrides)."
            )


def _new_params(config, workdir: str | None, model, task) -> tuple[str, ...]:
    """With freeze_body: the model's params the pretrained source lacks, trained with the head."""
    if not config.freeze_body:
        return ()
    batch = task.example_batch(1, config.max_length)
    shapes = nn.unbox(jax.eval_shape(lambda: task.init(model, jax.random.key(0), batch)["params"]))
    names = [
        "/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)
    ]
    return init_from.new_params(config, workdir, names)


def _weights_item(weights: str) -> str:
    """The checkpoint item to read: "ema", "params", or "auto" (the average where the step read holds
    one; decided per step, since the step read may not be the newest listed)."""
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"--weights={weights!r}; use auto, ema or raw")
    return {"raw": "params"}.get(weights, weights)


def build(
    config, workdir: str | None, *, tokenizer: str = "train", vocab_size: int | None = None, devices=None
) -> Experiment:
    """The experiment a config describes.

    tokenizer: "train" (the workdir's spm.model, trained on the train split on first use; in
    multi-process runs process 0 prepares data and tokenizer first), "load" (spm.model must exist:
    evaluation of a trained workdir), or "none" (no data, no tokenizer: synthetic benchmarks,
    with `vocab_size`). devices: the mesh's devices (default: all; `targets.devices` for a compile
    for a TPU or GPU that this machine does not have).
    """
    validate(config)
    task = tasks.get(config.task)
    data, sp = None, None
    if tokenizer == "none":
        vocab = vocab_size
    elif config.init_from_hf:  # the imported checkpoint's own tokenizer and vocabulary
        from flaxformer_lite import interop

        data = Data.from_config(config, workdir, task)
        sp, vocab = interop.load_tokenizer(config.init_from_hf), None
    elif config.init_from:  # a pretrained run of ours: its tokenizer, copied into workdir
        data = Data.from_config(config, workdir, task)
        sp = init_from.adopt_tokenizer(config.init_from, workdir)
        vocab = sp.get_piece_size()
    else:
        data = Data.from_config(config, workdir, task)
        sp = _tokenizer(config, workdir, data, train=tokenizer == "train")
        vocab = sp.get_piece_size()
    if task.classifies:  # as many classes as the dataset has
        config = classification.with_classes(config, len(data.labels) if data else 2)
    model = task.model_class(model_config(config, vocab))
    if config.init_from_hf:
        from flaxformer_lite import interop

        imported = interop.model_class(model.config)
        if imported is not task.model_class:
            raise ValueError(
                f"bad config: init_from_hf={config.init_from_hf!r} holds a {imported.__name__} model, but "
                f"task={task.name!r} trains a {task.model_class.__name__}; set --config.task to match."
            )
    new = _new_params(config, workdir, model, task) if tokenizer == "train" else ()  # readers: no updates
    tx, schedule = make_optimizer(config, model.config.d_model, new)
    mesh = sharding.make_mesh(
        config.mesh_data, config.mesh_fsdp, config.mesh_tensor, devices, context=config.mesh_context
    )
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % split or (config.batch_size // config.grad_accum_steps) % split:
        raise ValueError(
            f"bad config: batch_size={config.batch_size} (over grad_accum_steps={config.grad_accum_steps}) "
            f"does not split over the {split} devices that share a batch (mesh_data x mesh_fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple of "
            f"{split * config.grad_accum_steps} or change the mesh sizes."
        )
    return Experiment(config, workdir, task, data, sp, model, mesh, tx, schedule)


def _tokenizer(config, workdir: str, data: Data, *, train: bool):
    path = os.path.join(workdir, "spm.model")
    if not train:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no spm.model in {workdir!r}: is it the workdir of a train.py run?")
        return load_sentencepiece(path)
    options = dict(vocab_size=config.vocab_size, character_coverage=config.character_coverage)
    _check_tokenizer_options(path, options)
    return runtime.process_zero_first(
        lambda: _load_or_train(data.training_texts, path, options), key="tokenizer_ready"
    )


def _load_or_train(texts, path: str, options: dict):
    """The tokenizer at `path`, trained first if missing; the options it was trained with beside it."""
    trained = not os.path.exists(path)
    sp = load_or_train(texts, path, **options)
    if trained:
        with open(path + ".options.json", "w") as f:
            json.dump(options, f)
    return sp


def _check_tokenizer_options(path: str, options: dict) -> None:
    """A workdir's tokenizer trained with other options (vocab_size, ...) is never silently reused."""
    if not os.path.exists(path + ".options.json"):
        return
    fix = f"delete it and {path!r}, then rerun train.py (it trains the tokenizer again)"
    saved = files.read_json(path + ".options.json", fix)
    differ = [f"{k}={was!r} there but {now!r} here" for k, was, now in differences(saved, options)]
    if differ:
        raise ValueError(
            f"bad config: the workdir's tokenizer {path!r} was trained with {'; '.join(differ)}; use its "
            "settings (--config.vocab_size, --config.character_coverage) or start a new --workdir."
        )


def pad_rows(batch: dict, rows: int) -> dict:
    """Pad a short final batch with all-padding rows (weight 0) to a fixed row count."""
    n = next(iter(batch.values())).shape[0]
    return {k: np.pad(v, ((0, rows - n), (0, 0))) for k, v in batch.items()} if n < rows else batch
