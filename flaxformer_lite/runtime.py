"""The process around a run: jax.distributed, the workdir (writable, room for checkpoints)."""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp

MIN_FREE_BYTES = 200 * 2**20
PREPARE_TIMEOUT_S = 3 * 3600  # other processes wait this long for process 0's data preparation


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable workdir); the message says why and what to do."""


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
