"""Orbax checkpoints: params, optimizer state, data iterator position and config, with fallback.

Each step directory holds the items `params` (what inference needs, restored alone by eval.py
and generate.py), `opt` (step counter and optimizer state), `data` (grain iterator, one file per
process) and `config`. A step directory is written under a temporary name and renamed when
complete (orbax), so a crash mid-save leaves the previous checkpoints intact. On restore the
newest step that reads cleanly wins: its arrays match the checksums saved with them (checksums.py)
and its floating-point arrays are finite (a NaN step would fail at the next step or evaluate to
NaN). Training moves an unreadable one aside (`<step>.corrupt-<time>`,
kept, never read again) and names it in the log; readers (`restore_params`: eval.py, generate.py)
name it and read the previous one, moving nothing (their workdir may be read-only, or in use by a
training run). A checkpoint whose shapes differ from the model is not "corrupt" but a config
mismatch: that raises an error naming the parameter. Checkpoints of flaxformer_lite 0.1 (one
`state` item) still restore.
"""

from __future__ import annotations

import contextlib
import os
import time

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from flaxformer_lite import files
from flaxformer_lite.train import checksums, selection

_MAX_RELISTS = 20  # times a reader lists the steps again after one vanished while it was read
_RELIST = object()


def _listing(list_steps):
    """list_steps() (orbax listing the step directories), again while a step vanishes under it: a
    training run on the same workdir deleting a step it rotated out (orbax stats each step)."""
    for attempt in range(_MAX_RELISTS):
        try:
            return list_steps()
        except FileNotFoundError:
            if attempt == _MAX_RELISTS - 1:
                raise


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model or config."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_shapes(saved_tree, abstract_state, step: int, ckpt: Checkpointer) -> None:
    saved = {_path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved_tree)}
    wanted = {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
    fix = (
        f"The checkpoint in {ckpt.directory!r} (step {step}) was written with another model config: use a "
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
    """Saves every `save_every` steps (and when forced), keeps the newest `keep`, asynchronously.

    The newest checkpoint whose loss was healthy (see `save`) is kept as well, however many
    unhealthy ones come after it, so a run that diverges can always go back to it.
    """

    def __init__(
        self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True, keep_best: int = 0,
        metric: str = "", mode: str = "max",
    ):  # fmt: skip
        """keep_best: also keep the `keep_best` steps with the best validation `metric` (a key of
        the `scores` given to `save`; mode "max" or "min"), whatever their age."""
        self.directory = os.path.abspath(directory)
        self.metric, self.mode = metric, mode
        policies = ocp.checkpoint_managers
        keep_policy = [policies.LatestN(keep), selection.NewestHealthy()]
        if keep_best:
            keep_policy.append(selection.BestScores(metric, mode, keep_best))
        keep_policy = policies.AnyPreservationPolicy(keep_policy)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            preservation_policy=keep_policy,
            best_fn=lambda metrics: metrics.get("loss", 0.0),  # makes orbax store each step's metrics
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt": ocp.StandardCheckpointHandler(),
            "state": ocp.StandardCheckpointHandler(),  # the 0.1 layout, read only
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "ema": ocp.StandardCheckpointHandler(),  # the params' moving average, when kept
            "memory": ocp.StandardCheckpointHandler(),  # Transformer-XL memory, when kept
            "checksums": ocp.JsonCheckpointHandler(),  # of every array item (checksums.py)
        }
        self._saving = None  # the step whose (async) save may still be in flight
        # Handlers registered up front so a new process can read metadata before any save.
        self.manager = _listing(
            lambda: ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        )

    def save(
        self, step: int, state, data_iterator=None, config: dict | None = None, *, force=False, loss=None,
        healthy: bool = True, scores: dict | None = None,
    ) -> bool:  # fmt: skip
        """Start saving (returns at once when async); True if this step was saved.

        `loss`, `healthy` (the loss was finite and not exploding) and the validation `scores` are
        stored with the step; so are the checksums of its arrays, which every restore checks.
        """
        if not force and not self.manager.should_save(step):
            return False
        opt = {"step": state.step, "opt_state": state.opt_state}
        arrays = {"params": state.params, "opt": opt}
        if state.ema_params is not None:
            arrays["ema"] = state.ema_params
        if state.memory is not None:  # Transformer-XL memory: the next batch's rows continue it
            arrays["memory"] = state.memory
        items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        sums = {name: checksums.tree_checksums(tree) for name, tree in arrays.items()}
        items["checksums"] = ocp.args.JsonSave({"version": checksums.VERSION, **sums})
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self.wait()  # an error of the previous (async) save surfaces here, under its own step
        with self._write_errors(step):
            metrics = {"healthy": float(healthy), **({} if loss is None else {"loss": float(loss)})}
            metrics.update({k: float(v) for k, v in (scores or {}).items()})
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)
        self._saving = step if saved else None
        return saved

    def save_params(self, step: int, params, config: dict) -> None:
        """A checkpoint of params alone (an average of checkpoints), read like any other by readers."""
        items = {
            "params": ocp.args.StandardSave(params),
            "config": ocp.args.JsonSave(config),
            "checksums": ocp.args.JsonSave(
                {"version": checksums.VERSION, "params": checksums.tree_checksums(params)}
            ),
        }
        with self._write_errors(step):
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self.manager.wait_until_finished()

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

    def set_aside_unhealthy(self) -> str:
        """After divergence: move every step newer than the newest healthy one aside, describe what is kept.

        A rerun then resumes from the healthy step, not from a diverged one.
        """
        self.wait()
        infos = {s: (self.manager.metrics(s) or {}) for s in self.steps()}
        healthy = [s for s in sorted(infos) if infos[s].get("healthy", 1.0) > 0]
        keep = healthy[-1] if healthy else None
        moved = [s for s in sorted(infos) if keep is None or s > keep]
        for s in moved:
            self._move_aside(s, None, suffix="diverged")
        what = f"step {keep} in {self.directory}" if keep is not None else f"none in {self.directory}"
        if moved:
            what += (
                f"; the newer checkpoints {moved} had exploding losses and were moved aside (*.diverged-*)"
            )
        return what

    def describe_latest(self) -> str:
        """'step N in DIR' for the newest checkpoint started so far, for error messages."""
        step = self.manager.latest_step()
        return f"step {step} in {self.directory}" if step is not None else f"none yet in {self.directory}"

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """(step, TrainState) from the newest readable checkpoint (or `step`); None if there is none.

        `abstract_state` is a TrainState of jax.ShapeDtypeStruct with shardings (restored sharded).
        `data_iterator`, if given, is moved to the saved position.
        """

        def read(s, saved):
            if "state" in saved:  # the 0.1 layout: one TrainState item
                _check_shapes(
                    {"params": saved["state"]["params"]}, {"params": abstract_state.params}, s, self
                )
                items = {"state": ocp.args.StandardRestore(abstract_state)}
            else:
                _check_shapes({"params": saved["params"]}, {"params": abstract_state.params}, s, self)
                opt = {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
                items = {"params": ocp.args.StandardRestore(abstract_state.params)}
                items["opt"] = ocp.args.StandardRestore(opt)
                if abstract_state.ema_params is not None and "ema" in saved:
                    items["ema"] = ocp.args.StandardRestore(abstract_state.ema_params)
                if abstract_state.memory is not None:
                    items["memory"] = ocp.args.StandardRestore(abstract_state.memory)
            out = self.manager.restore(s, args=ocp.args.Composite(**items))
            if "state" in out and out["state"] is not None:
                state = out["state"]
                checksums.check_finite({"params": state.params, "opt": state.opt_state})
            else:
                arrays = {name: out[name] for name in ("params", "opt", "ema", "memory") if name in items}
                self._verify(s, arrays)
                checksums.check_finite(arrays)
                ema = None  # a run that starts keeping an average starts from the params (a copy: donated)
                if abstract_state.ema_params is not None:
                    ema = out["ema"] if "ema" in items else jax.tree.map(jnp.copy, out["params"])
                state = abstract_state.replace(
                    step=out["opt"]["step"], params=out["params"], opt_state=out["opt"]["opt_state"],
                    ema_params=ema, memory=out.get("memory"),
                )  # fmt: skip
            if data_iterator is not None:  # last: a step found damaged above never moves the iterator
                data = grain.checkpoint.CheckpointRestore(data_iterator)
                self.manager.restore(s, args=ocp.args.Composite(data=data))
            return state

        return self._newest_readable(read, step)

    def restore_params(self, abstract_params, step: int | None = None, item: str = "params"):
        """(step, params) from the newest readable checkpoint (or `step`), without optimizer state.

        item: "params", "ema" for the moving average of the params (where the run kept one), or
        "auto": the moving average where the step read holds one, else the params."""

        def read(s, saved):
            name = ("ema" if "ema" in saved else "params") if item == "auto" else item
            if "state" in saved:  # the 0.1 layout: read the whole state (replicated), keep params
                tree = saved["state"]
                _check_shapes({"params": tree["params"]}, {"params": abstract_params}, s, self)
                sharding = jax.tree.leaves(abstract_params)[0].sharding
                replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                target = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), tree
                )
                state = self.manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
                )
                checksums.check_finite({"params": state["state"]["params"]})
                return jax.device_put(
                    state["state"]["params"], jax.tree.map(lambda x: x.sharding, abstract_params)
                )
            if name not in saved:
                raise CheckpointMismatchError(
                    f"checkpoint step {s} in {self.directory!r} holds no {name!r} weights (the run kept "
                    "no moving average: train with --config.ema_decay, or read --weights=raw)"
                )
            _check_shapes({"params": saved[name]}, {"params": abstract_params}, s, self)
            params = self.manager.restore(
                s, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract_params)})
            )[name]
            self._verify(s, {name: params})
            checksums.check_finite({name: params})
            logging.info("read the %s weights of step %d in %s", name, s, self.directory)
            return params

        return self._newest_readable(read, step, move_aside=False)

    def _verify(self, step: int, restored: dict) -> None:
        """Raise if a restored item's checksums differ from those saved with it (damaged files)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "checksums")):
            return  # written before checksums were saved
        saved = self.manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))
        saved = saved["checksums"]
        version = saved.get("version", 1)  # 1: saved before the version was stored (checksums.py)
        for name, tree in restored.items():
            wrong = checksums.first_difference(saved.get(name, {}), checksums.tree_checksums(tree, version))
            if wrong is not None:
                raise ValueError(
                    f"the checksum of {name}{wrong} differs from the one saved with it: its files are damaged"
                )

    def best_step(self) -> int | None:
        """The step with the best validation score among the checkpoints kept (None without scores).

        The score is this Checkpointer's metric, or else the one the checkpoints carry (a reader
        whose config does not name the valid_metric the run was trained with)."""
        _, mode, scores = self.scores()
        ranked = selection.best_steps(scores, mode, 1)
        return ranked[0] if ranked else None

    def scores(self) -> tuple[str, str, list[tuple[int, float]]]:
        """(metric, mode, [(step, score)]) of the checkpoints kept: this Checkpointer's metric, or
        else the one the checkpoints carry (a reader whose config does not name the run's valid_metric)."""
        metrics = {s: self.manager.metrics(s) or {} for s in self.steps()}
        metric, mode = self.metric, self.mode
        if metric not in {k for m in metrics.values() for k in m}:
            carried = sorted({k for m in metrics.values() for k in m if k.startswith("valid_")})
            metric = carried[0] if carried else metric
            mode = next((way for key, way in selection.METRICS.values() if f"valid_{key}" == metric), mode)
        return (
            metric,
            mode,
            [(s, m[metric]) for s, m in metrics.items() if metric in m and m[metric] == m[metric]],
        )

    def _newest_readable(self, read, step: int | None, move_aside: bool = True):
        """read(step, item metadata) of the newest step that reads (or of `step`); None if none exist.

        A step that cannot be read is skipped, and the next older one is tried; with `move_aside`
        (training) it is first moved aside (by process 0), so no later run reads it again. A step
        that vanishes while it is read is not damaged: a training run on the same workdir rotated it
        out (keep_checkpoints), so the steps are listed again and the newest one is read.
        """
        if step is not None and step not in self.steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory!r}; have {self.steps()}."
            )
        damaged: list[int] = []  # in the order tried, newest first
        for relists_left in reversed(range(_MAX_RELISTS + 1)):
            listed = self.steps()
            candidates = [step] if step is not None else [s for s in reversed(listed) if s not in damaged]
            newest = listed[-1] if step is None and listed else None
            found = self._read_first(read, candidates, damaged, move_aside, newest if relists_left else -1)
            if found is not _RELIST:
                break
            if step is not None and step not in self.steps():
                raise FileNotFoundError(
                    f"checkpoint step {step} in {self.directory!r} was deleted while it was read (a "
                    f"training run on this workdir rotated it out: keep_checkpoints); have {self.steps()}."
                )
        if found is not None:
            newer = [d for d in damaged if d > found[0]]
            if newer:
                logging.warning(
                    "%s step %d: newer checkpoints %s were unreadable",
                    "resumed from" if move_aside else "reading", found[0], newer,
                )  # fmt: skip
            return found
        if not damaged:
            return None
        if move_aside:
            raise ValueError(
                f"none of the checkpoints {damaged} in {self.directory!r} is readable; they were moved "
                "aside (*.corrupt-*). Start a new run in another --workdir, or move one back."
            )
        raise ValueError(
            f"none of the checkpoints {damaged} in {self.directory!r} is readable (see the warnings "
            "above). Train again in another --workdir, or restore this one from a backup."
        )

    def _read_first(self, read, candidates: list[int], damaged: list[int], move_aside: bool, newest):
        """(step, read(step, ...)) of the first of `candidates` that reads, None if none does, or
        _RELIST when one vanished while it was read (`newest`: the newest step listed, None for a
        step asked for by number, -1: no more listing). Damaged steps join `damaged`."""
        for s in candidates:
            try:
                return s, read(s, self._item_trees(s))
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001  (any read failure means: try an older one)
                if newest != -1 and self._rotated_out(s, newest):
                    logging.info("checkpoint step %d was deleted while it was read; listing again", s)
                    return _RELIST
                damaged.append(s)
                if move_aside:
                    self._move_aside(s, e)
                else:
                    logging.warning(
                        "checkpoint step %d in %s is unreadable (%s); reading the previous one (the "
                        "files stay where they are; a train.py run on this workdir moves it aside)",
                        s, self.directory, files.reason(e),
                    )  # fmt: skip
        return None

    def _rotated_out(self, step: int, newest: int | None) -> bool:
        """Whether `step` failed to read because a training run is rotating it out: a fresh listing
        lacks it, or holds a step newer than `newest` (the run saved one, and deletes the oldest
        after the save; a step half deleted is still listed)."""
        _listing(self.manager.reload)
        now = self.steps()
        return step not in now or (newest is not None and bool(now) and now[-1] > newest)

    def _item_trees(self, step: int) -> dict:
        """{item name: tree of array metadata} of the array items a step holds."""
        names = [
            n
            for n in ("params", "opt", "state", "ema", "memory")
            if os.path.isdir(os.path.join(self.directory, str(step), n))
        ]
        if "params" not in names and "state" not in names:
            raise ValueError("it holds neither a params nor a state item")
        metadata = self.manager.item_metadata(step)
        trees = {}
        for name in names:
            tree = getattr(metadata[name], "tree", metadata[name])
            if tree is None:
                raise ValueError(f"no metadata for item {name!r}")
            trees[name] = tree
        return trees

    def _move_aside(self, step: int, error: Exception | None, suffix: str = "corrupt") -> None:
        """Rename a step to `<step>.<suffix>-<time>` (kept for inspection, never read again)."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.{suffix}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and os.path.isdir(src):
            os.replace(src, dst)
        if error is not None:
            reason = files.reason(error)
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s); moved it to %s and trying the previous one",
                step, self.directory, reason, os.path.basename(dst),
            )  # fmt: skip
        barrier = ocp.multihost.get_barrier_sync_fn()  # every process sees the rename before reloading
        barrier(key=f"flaxformer_lite:moved_aside_{step}", timeout_ms=300_000)
        self.manager.reload()

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
