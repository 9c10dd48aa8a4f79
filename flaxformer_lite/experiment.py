"""Build an experiment from an ml_collections config: data sources, tokenizer, model, iterators.

Shared by train.py and eval.py so both see exactly the same tokenizer, features and model.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from flaxformer_lite import input_pipeline as ip
from flaxformer_lite.config import ModelConfig, preset
from flaxformer_lite.models import DecoderOnly, EncoderDecoder, EncoderOnly

MODELS = {"translation": EncoderDecoder, "lm": DecoderOnly, "mlm": EncoderOnly}


def validate(config) -> None:
    """Fail early, naming the field and the fix."""

    def need(ok, msg):
        if not ok:
            raise ValueError(f"bad config: {msg}")

    need(config.task in MODELS, f"task={config.task!r}; use one of {sorted(MODELS)}")
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
        config.scheduled_sampling_max_prob == 0 or config.task == "translation",
        "scheduled sampling is for task='translation' only",
    )


def data_dir(config, workdir: str) -> str:
    return config.data_dir or ip.default_data_dir(workdir)


def _source_kwargs(config) -> dict:
    kwargs = {"manual_dir": config.manual_dir} if config.manual_dir else {}
    if config.db_path and config.dataset_name.startswith("bible_"):
        kwargs["db_path"] = config.db_path
    return kwargs


def open_split(config, workdir: str, split: str):
    return ip.open_source(config.dataset_name, split, data_dir(config, workdir), **_source_kwargs(config))


def feature_keys(config, workdir: str) -> dict[str, str]:
    """Model input name -> dataset feature: {"inputs": src, "targets": tgt} or {"targets": text}."""
    if config.task == "translation":
        src, tgt = ip.supervised_keys(
            config.dataset_name,
            data_dir(config, workdir),
            config.reverse_translation,
            **_source_kwargs(config),
        )
        return {"inputs": src, "targets": tgt}
    return {"targets": "text"}


def tokenizer(config, workdir: str):
    """The workdir's SentencePiece model, trained on the train split on first use."""
    return ip.get_tokenizer(
        config.dataset_name,
        data_dir(config, workdir),
        os.path.join(workdir, "spm.model"),
        sorted(set(feature_keys(config, workdir).values())),
        vocab_size=config.vocab_size,
        character_coverage=config.character_coverage,
        **_source_kwargs(config),
    )


def model_config(config, vocab_size: int) -> ModelConfig:
    """The preset with overrides; vocab from the tokenizer, max_len long enough for the data."""
    overrides = {k: v for k, v in config.model.overrides.items() if v is not None}  # None = preset's value
    overrides.pop("vocab_size", None)  # always the tokenizer's
    cfg = preset(config.model.preset, vocab_size=vocab_size, **overrides)
    need_len = max(config.max_length, config.max_decode_length)
    return cfg if cfg.max_len >= need_len else cfg.replace(max_len=need_len)


def make_model(config, vocab_size: int):
    return MODELS[config.task](model_config(config, vocab_size))


def host_batch_size(config) -> int:
    return config.batch_size // jax.process_count()


def train_dataset(config, workdir: str, sp, stats: ip.TokenizeStats | None = None):
    """Endless, shuffled, packed per-host batches of the train split."""
    source = open_split(config, workdir, config.train_split)
    tok = ip.Tokenize(sp, feature_keys(config, workdir), config.max_length, stats)
    return ip.make_dataset(
        source,
        tok,
        batch_size=host_batch_size(config),
        max_length=config.max_length,
        pack=config.pack,
        shuffle=True,
        seed=config.seed,
        num_epochs=None,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )


def eval_dataset(config, workdir: str, sp, split: str | None = None):
    """One pass over an eval split in order, unpacked, last batch padded with empty rows."""
    source = open_split(config, workdir, split or config.eval_split)
    tok = ip.Tokenize(sp, feature_keys(config, workdir), config.max_length)
    ds = ip.make_dataset(
        source,
        tok,
        batch_size=host_batch_size(config),
        max_length=config.max_length,
        pack=False,
        shuffle=False,
        num_epochs=1,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        drop_remainder=False,
    )
    return ds.map(lambda b: pad_rows(b, host_batch_size(config)))


def pad_rows(batch: dict, rows: int) -> dict:
    """Pad a short final batch with all-padding rows (weight 0) to a fixed row count."""
    n = next(iter(batch.values())).shape[0]
    return {k: np.pad(v, ((0, rows - n), (0, 0))) for k, v in batch.items()} if n < rows else batch


def optimizer(config, d_model: int):
    """(tx, schedule) as configured; eval.py builds the same to read checkpoints."""
    from flaxformer_lite import training

    schedule = training.make_schedule(
        config.schedule,
        d_model=d_model,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        total_steps=config.num_train_steps,
    )
    tx = training.make_optimizer(
        schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm or None,
    )
    return tx, schedule


def parse_flags(argv):
    """absl flags parser for the scripts: a bad --config.x override is a one-line error, not a traceback."""
    from absl import flags

    try:
        argv = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()  # a config file that failed to load raises here, not later
        return argv
    except OSError as e:
        sys.exit(f"error: cannot load --config: {_one_line(e.__cause__ or e)}")
    except flags.Error as e:  # a missing required flag, a value of the wrong type, a bad config file
        sys.exit(f"error: {_one_line(e)} (see {os.path.basename(argv[0])} --helpfull)")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: bad --config override: {_one_line(e)}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)  # KeyError quotes its message
    text = text.replace("\\n", "\n").replace("\\'", "'")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# What a user can fix (bad config, missing or bad files, a full disk): one line, no traceback.
USER_ERRORS = (ValueError, OSError)


def exit_with_error(e: BaseException) -> None:
    """Print `error: <one line>` to stderr and end the process with status 1."""
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # everything is saved or closed by now; skip the shutdown noise of orbax's threads
