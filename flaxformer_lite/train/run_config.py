"""What a config may say, and what a resumed run may change: checks that name the field and the fix.

`validate` fails early on a bad config; `model_config` and `make_optimizer` turn a config into a
ModelConfig and an optax optimizer; `resume_changes` and `schedule_horizon` decide what a run
resumed from a checkpoint may change (train.py, through `Experiment.for_resume`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from typing import Any

import jax

from flaxformer_lite import tasks
from flaxformer_lite.cli import need
from flaxformer_lite.config import ModelConfig, preset
from flaxformer_lite.train import checkpoint, mrt, recurrence, selection, training

# ModelConfig fields that change how a model runs, not what it computes.
NOT_ARCHITECTURE = (
    "dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers", "deterministic", "decode",
    "dropout_rate", "attention_dropout_rate", "max_len", "init_std", "max_segments", "context_strategy",
    "memory_length",  # Transformer-XL memory: the same params read with more (or less) context
)  # fmt: skip


# Config fields a resumed run may change: how long it runs, how often it logs, evaluates and saves,
# where the prepared data lives, how the work is spread over devices and processes, and how the
# model runs (not what it computes). Any other change on resume is refused (`resume_changes`).
RESUMABLE_CHANGES = (
    "num_train_steps", "log_every", "eval_every", "eval_batches", "bleu_every", "bleu_examples",
    "max_decode_length", "checkpoint_every", "keep_checkpoints", "async_checkpoints", "data_dir",
    "mesh_data", "mesh_fsdp", "mesh_tensor", "distributed", "coordinator_address", "num_processes",
    "process_id", "model.overrides.attention_impl", "model.overrides.remat_policy", "keep_best", "patience",
    "valid_beam_size", "objective", "mrt_candidates", "mrt_source", "mrt_temperature", "mrt_alpha", "mrt_mix",
    "mesh_context", "context_strategy", "context_load_balance",
    "long_document_window", "long_document_strides", "long_document_memory",  # read by eval.py only
)  # fmt: skip


# Config fields that decide which data is prepared and how it is tokenized. A resumed run that
# changes one is refused before anything is prepared (`refuse_other_data`, called by train.py before
# experiment.build); every field is compared once the experiment is built (`Experiment.for_resume`).
DATA_FIELDS = (
    "task", "dataset_name", "manual_dir", "corpus_fields", "db_path", "reverse_translation", "train_split",
    "vocab_size", "character_coverage",
)  # fmt: skip


def refused_resume(workdir: str, step: int, refused: list[str]) -> checkpoint.CheckpointMismatchError:
    """The one-line error for a resume that would change what the run computes."""
    return checkpoint.CheckpointMismatchError(
        f"workdir {workdir!r} holds a run (checkpoint of step {step}) made with other settings: "
        f"{'; '.join(refused)}. Resume with the settings it was trained with, or start a new --workdir; "
        f"a resumed run may change only {', '.join(RESUMABLE_CHANGES)}."
    )


def refuse_other_data(saved: dict | None, config, workdir: str, step: int) -> None:
    """Refuse a resume from a checkpoint (its `saved` config) trained on other data (DATA_FIELDS)."""
    if saved:
        refused = [r for r in resume_changes(saved, config)[0] if r.split(":", 1)[0] in DATA_FIELDS]
        if refused:
            raise refused_resume(workdir, step, refused)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old, new, skip: Collection[str] = ()) -> list[tuple[str, Any, Any]]:
    """(name, old value, new value) for each field of `new` that `old` also has, with another value.

    `old` and `new` are mappings or dataclass instances (their fields, not recursed into); in the
    order of `new`'s fields. Fields in `skip`, and fields only one side has, are not compared.
    """
    old, new = _fields(old), _fields(new)
    return [(k, old[k], v) for k, v in new.items() if k not in skip and k in old and old[k] != v]


def _fields(x) -> Mapping:
    if isinstance(x, Mapping):
        return x
    return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}


def resume_changes(saved: dict, config) -> tuple[list[str], list[str]]:
    """(refused, allowed): the fields that differ between a checkpoint's saved config and `config`,
    as "field: old -> new". Fields the saved config lacks (added to the code since) are not compared."""
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    refused, allowed = [], []
    for key, was, now in sorted(differences(old, new), key=lambda d: d[0]):
        (allowed if key in RESUMABLE_CHANGES else refused).append(f"{key}: {was!r} -> {now!r}")
    return refused, allowed


def schedule_horizon(saved: dict | None, config) -> int:
    """The steps a cosine schedule decays over: `schedule_steps` if set, else the num_train_steps the
    run started with (read from its checkpoint's config). So extending a finished run goes on at the
    schedule's final rate instead of restarting the decay."""
    if config.schedule_steps:
        return config.schedule_steps
    if saved:
        return saved.get("schedule_steps") or saved.get("num_train_steps") or config.num_train_steps
    return config.num_train_steps


def validate(config) -> None:
    """Fail early, naming the field and the fix."""

    task = tasks.get(config.task)
    need(config.num_train_steps >= 0, f"num_train_steps={config.num_train_steps} must be >= 0")
    need(config.batch_size > 0, f"batch_size={config.batch_size} must be positive")
    need(config.grad_accum_steps >= 1, f"grad_accum_steps={config.grad_accum_steps} must be >= 1")
    need(
        config.batch_size % config.grad_accum_steps == 0,
        f"batch_size={config.batch_size} must be divisible by grad_accum_steps={config.grad_accum_steps}",
    )
    need(
        config.batch_size % jax.process_count() == 0,
        f"batch_size={config.batch_size} must be divisible by the {jax.process_count()} processes",
    )
    need(config.max_length >= 4, f"max_length={config.max_length} is too short; use at least 4")
    need(config.checkpoint_every > 0, f"checkpoint_every={config.checkpoint_every} must be positive")
    need(config.log_every > 0, f"log_every={config.log_every} must be positive")
    need(0 <= config.label_smoothing < 1, f"label_smoothing={config.label_smoothing} must be in [0, 1)")
    need(
        config.scheduled_sampling_max_prob == 0 or task.translates,
        f"scheduled sampling is for translation tasks, not task={task.name!r}",
    )
    need(config.schedule_steps >= 0, f"schedule_steps={config.schedule_steps} must be >= 0")
    selection.check_config(config, task)
    training.check_context(config, task)
    mrt.check_config(config, task)
    recurrence.check_config(config, task)
    need(
        not (config.init_from and config.init_from_hf),
        "init_from and init_from_hf are both set; start from one of them",
    )
    need(
        not config.freeze_body or task.classifies,
        f"freeze_body is for classification, not task={task.name!r}",
    )
    need(
        not config.next_sentence or task.name == "mlm",
        f"next_sentence is for task='mlm', not {task.name!r}",
    )
    need(
        not config.next_sentence or config.label_smoothing == 0,
        "next_sentence needs label_smoothing=0 (the pair logits share the vocabulary's softmax)",
    )


def model_config(config, vocab_size: int) -> ModelConfig:
    """The preset with overrides; vocab from the tokenizer, max_len long enough for the data.

    With `init_from_hf` the architecture is the imported checkpoint's, and only the overrides of
    how it runs (dtype, dropout, remat, ...: NOT_ARCHITECTURE) apply.
    """
    overrides = {k: v for k, v in config.model.overrides.items() if v is not None}  # None = preset's value
    if config.init_from_hf:
        from flaxformer_lite import interop

        cfg = interop.config_from_dir(config.init_from_hf)
        runtime_fields = {k: v for k, v in overrides.items() if k in NOT_ARCHITECTURE and k != "max_len"}
        head = {k: v for k, v in overrides.items() if k in ("num_classes", "pooling")}  # a new classifier's
        runtime_fields["context_strategy"] = _context_strategy(config)
        return cfg.replace(**runtime_fields, **head, **({} if config.pack else {"max_segments": 1}))
    overrides.pop("vocab_size", None)  # always the tokenizer's
    if not config.pack:
        overrides.setdefault("max_segments", 1)  # padded rows: one sequence each
    overrides["context_strategy"] = _context_strategy(config)
    cfg = preset(config.model.preset, vocab_size=vocab_size, **overrides)
    need_len = max(config.max_length, config.max_decode_length)
    return cfg if cfg.max_len >= need_len else cfg.replace(max_len=need_len)


def _context_strategy(config) -> str:
    """The run's context-parallel strategy (a config saved by a checkpoint older than it: the default)."""
    return config.get("context_strategy", "all_gather")


def make_optimizer(config, d_model: int, new_params: tuple[str, ...] = ()):
    """(tx, schedule) as configured (the cosine decays over schedule_steps, or num_train_steps if 0).

    new_params: with freeze_body, the body's params the pretrained model lacks (trained, not frozen:
    `init_from.new_params`)."""
    schedule = training.make_schedule(
        config.schedule,
        d_model=d_model,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        total_steps=config.schedule_steps or config.num_train_steps,
    )
    tx = training.make_optimizer(
        schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm or None,
    )
    if config.freeze_body:  # fine-tune the classification head alone
        from flaxformer_lite.tasks.classification import freeze_body

        tx = freeze_body(tx, frozenset(new_params))
    return tx, schedule
