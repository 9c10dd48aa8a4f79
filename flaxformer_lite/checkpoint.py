"""Orbax checkpoints of the train state, the data iterator position and the config, with fallback.

A step directory is written under a temporary name and renamed when complete (orbax), so a crash
mid-save leaves the previous checkpoints intact. On restore the newest step that reads cleanly
wins; an unreadable one is reported and skipped. A checkpoint whose shapes differ from the model
is not "corrupt" but a config mismatch: that raises an error naming the parameter.
"""

from __future__ import annotations

import contextlib
import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model or config."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_shapes(saved_tree, abstract_state, step: int, directory: str) -> None:
    saved = {_path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved_tree)}
    wanted = {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
    fix = (
        f"The checkpoint in {directory!r} (step {step}) was written with another model config: use a "
        "new --workdir, or the config that wrote it."
    )
    for name, shape in wanted.items():
        if name not in saved:
            raise CheckpointMismatchError(f"checkpoint has no parameter {name!r} (shape {shape}). {fix}")
        if saved[name] != shape:
            raise CheckpointMismatchError(
                f"parameter {name!r} has shape {saved[name]} in the checkpoint but {shape} in the model. "
                + fix
            )
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise CheckpointMismatchError(f"checkpoint has parameters the model lacks: {extra[:5]}. {fix}")


class Checkpointer:
    """Saves every `save_every` steps (and when forced), keeps the newest `keep`, asynchronously."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self._saving = None  # the step whose (async) save may still be in flight
        # Handlers registered up front so a new process can read metadata before any save.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state, data_iterator=None, config: dict | None = None, *, force=False) -> bool:
        """Start saving (returns at once when async); True if this step was saved."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self.wait()  # an error of the previous (async) save surfaces here, under its own step
        with self._write_errors(step):
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        self._saving = step if saved else None
        return saved

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete."""
        with self._write_errors(self._saving):
            self.manager.wait_until_finished()
        self._saving = None

    @contextlib.contextmanager
    def _write_errors(self, step):
        try:
            yield
        except Exception as e:  # disk full, quota, permissions (tensorstore reports them as ValueError)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            complete = self.steps()
            kept = f"the complete checkpoints {complete} are kept" if complete else "none was complete"
            raise CheckpointWriteError(
                f"writing the checkpoint of step {step} to {self.directory!r} failed ({reason}); {kept}. "
                "Free space (or fix the directory) and rerun the same command to resume."
            ) from e

    @contextlib.contextmanager
    def finishing_saves(self):
        """On any error (or Ctrl-C) inside the block, let in-flight saves of good steps complete."""
        try:
            yield
        except BaseException:
            try:
                self.manager.close()  # waits for in-flight saves, stops orbax's threads
            except Exception as e:  # noqa: BLE001  (report the original error, not this one)
                logging.warning("an in-flight checkpoint save failed too: %s", str(e).splitlines()[0])
            raise

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def describe_latest(self) -> str:
        """'step N in DIR' for the newest checkpoint started so far, for error messages."""
        step = self.manager.latest_step()
        return f"step {step} in {self.directory}" if step is not None else f"none yet in {self.directory}"

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """(step, state) from the newest readable checkpoint (or `step`); None if there is none.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings (restored sharded).
        `data_iterator`, if given, is moved to the saved position.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if step is not None and step not in self.steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory!r}; have {self.steps()}."
            )
        for s in candidates:
            try:
                metadata = self.manager.item_metadata(s)["state"]
                saved_tree = getattr(metadata, "tree", metadata)
                if saved_tree is None:
                    raise ValueError("no state metadata")
            except Exception as e:  # noqa: BLE001  (any read failure means: try an older one)
                logging.warning(
                    "checkpoint step %d in %s is unreadable (%s); trying the previous one",
                    s,
                    self.directory,
                    e,
                )
                continue
            _check_shapes(saved_tree, abstract_state, s, self.directory)
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001
                logging.warning(
                    "checkpoint step %d in %s is unreadable (%s); trying the previous one",
                    s,
                    self.directory,
                    e,
                )
                continue
            if s != candidates[0]:
                logging.warning(
                    "resumed from step %d: newer checkpoints %s were unreadable",
                    s,
                    candidates[: candidates.index(s)],
                )
            return s, restored["state"]
        if candidates:
            raise ValueError(f"none of the checkpoints {candidates} in {self.directory!r} is readable.")
        return None

    def saved_config(self, step: int) -> dict | None:
        """The config JSON saved with `step`, if any."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
                "config"
            ]
        except Exception:  # noqa: BLE001
            return None

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs with the given shardings, to restore a state sharded as it will be used."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
