"""The process around a run: jax.distributed, the workdir (writable, room for checkpoints)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import sys
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

MIN_FREE_BYTES = 200 * 2**20
PREPARE_TIMEOUT_S = 3 * 3600  # other processes wait this long for process 0's data preparation


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable workdir); the message says why and what to do."""


class Stopped(BaseException):
    """The run stopped because it was asked to (SIGTERM, Ctrl-C), after saving what there was to save.

    A BaseException, as KeyboardInterrupt: raised from a signal handler anywhere, it must not be
    taken for a reader's or a library's failure by their `except Exception` clauses."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequests:
    """SIGTERM and Ctrl-C ask the run to finish its step, save a checkpoint and exit.

    One process: our own handlers for SIGTERM and SIGINT; a second signal exits at once. Several
    processes: SIGTERM goes to JAX's preemption service (started by jax.distributed), and every
    process stops at the same step through orbax's preemption sync point; Ctrl-C, which reaches
    one process only, exits that process at once (the others then fail at their next collective).
    """

    def __init__(self):
        self.received: str | None = None
        self.in_loop = False  # outside the training loop (data, tokenizer, compile, final eval) a
        # signal stops the run at once: there is no step to finish and nothing new to save
        self.multi = jax.process_count() > 1
        signals = [signal.SIGINT] if self.multi else [signal.SIGINT, signal.SIGTERM]
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None or self.multi:
            print(f"error: {name} received again; exiting now without saving.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if not self.in_loop:
            raise Stopped(
                f"{name} received outside the training loop; stopped at once (no step was running: the "
                "complete checkpoints and prepared data are kept): rerun the same command to continue",
                128 + signum,
            )
        self.received = name
        logging.warning(
            "%s received: finishing this step and saving a checkpoint (again: exit at once)", name
        )

    def requested(self, step: int, manager) -> str | None:
        """The signal to stop for at `step` (the same step on every process), or None."""
        if self.received is None and self.multi and manager.reached_preemption(step):
            self.received = "SIGTERM"
        return self.received

    @contextlib.contextmanager
    def training_loop(self):
        """While inside, a signal finishes the current step and saves before the run stops."""
        self.in_loop = True
        try:
            yield
        finally:
            self.in_loop = False

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class WorkdirLock:
    """An exclusive lock on the workdir for one training run (per process index).

    flock is released by the kernel when the process ends, however it ends, so a crashed run
    never leaves a stale lock; the file keeps the holder's pid and host for the error message.
    """

    def __init__(self, workdir: str):
        path = os.path.join(workdir, f".train.lock.{jax.process_index()}")
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise TrainingError(
                f"workdir {workdir!r} is in use by another train.py ({holder}); wait for it to finish, "
                "stop it, or pick another --workdir."
            ) from None
        self.file.seek(0)
        self.file.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {since}")
        self.file.flush()

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def initialize_distributed(config) -> None:
    """jax.distributed for multi-process runs (CPU devices talk through gloo, JAX's default)."""
    if not config.distributed:
        return
    kwargs = {}
    if config.coordinator_address:
        kwargs = dict(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
        if config.coordinator_address.split(":")[0] in ("127.0.0.1", "localhost"):
            kwargs["coordinator_bind_address"] = config.coordinator_address  # JAX binds all interfaces
    jax.distributed.initialize(**kwargs)


def process_zero_first(fn, key: str):
    """fn() on process 0, then on the others once process 0 is done (data preparation, tokenizer).

    On a shared filesystem the others find everything ready; with per-host disks each prepares its
    own copy (both are deterministic). The wait is a barrier of the distributed runtime, not a
    device collective (those time out in seconds).
    """
    result = fn() if jax.process_index() == 0 else None
    barrier = ocp.multihost.get_barrier_sync_fn()  # a no-op with one process
    barrier(key=f"flaxformer_lite:{key}", timeout_ms=PREPARE_TIMEOUT_S * 1000)
    return result if jax.process_index() == 0 else fn()


def prepare_workdir(workdir: str) -> None:
    """Create the workdir and prove it is writable with room to spare, before any real work."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe.{os.getpid()}")  # one per process
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(
            f"workdir {workdir!r} is not writable ({e.strerror}); pick another --workdir."
        ) from e
    free = shutil.disk_usage(workdir).free
    if free < MIN_FREE_BYTES:
        raise TrainingError(
            f"workdir {workdir!r} has only {free / 2**20:.0f} MiB free; free space or pick another --workdir."
        )


def check_room_for_checkpoints(state, workdir: str, keep: int) -> None:
    """Fail before training when the disk cannot hold the checkpoints the run will write."""
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    need = MIN_FREE_BYTES + (keep + 1) * size  # a new checkpoint is written before the oldest goes
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise TrainingError(
            f"workdir {workdir!r} has {free / 2**20:.1f} MiB free but {keep + 1} checkpoints of "
            f"{size / 2**20:.1f} MiB need {need / 2**20:.1f} MiB; free space, lower keep_checkpoints, "
            "or pick another --workdir."
        )
