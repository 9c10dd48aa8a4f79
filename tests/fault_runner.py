"""train.py with a fault injected, for tests/test_faults.py: python -m tests.fault_runner <train.py flags>.

FAULT_KILL_IN_COMMIT_OF_STEP=N: the process SIGKILLs itself while committing the checkpoint of
step N, after every file of it is written to orbax's temporary directory and before the rename
that makes it a checkpoint (the moment a crash is most likely to leave a half-made checkpoint).
FAULT_MAX_FILE_BYTES=N: no file may grow past N bytes (RLIMIT_FSIZE), so writes fail the way
they do on a full disk, with an OSError from the kernel.
FAULT_EXPLODE_FROM_STEP=N, FAULT_NAN_AT_STEP=M: the reported loss is multiplied by 1e6 from step N
and becomes NaN at step M, as a diverging run's would (the params stay those of the real run).
FAULT_SIGTERM_IN_TOKENIZER_AT=N: the process sends itself SIGTERM while SentencePiece reads the
N-th training text (the signal arrives inside SentencePiece's callback).
"""

import os
import resource
import signal

from absl import app
from orbax.checkpoint._src.path import atomicity

import train
from flaxformer_lite import cli
from flaxformer_lite.train import training

KILL_STEP = os.environ.get("FAULT_KILL_IN_COMMIT_OF_STEP")
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _finalize_or_die(self, *args, **kwargs):
    if KILL_STEP is not None and self._final_path.name == KILL_STEP:
        with open(os.path.join(self.get(), "KILLED_HERE"), "w") as f:
            f.write("the runner killed itself before renaming this directory")
        os.kill(os.getpid(), signal.SIGKILL)
    return await _finalize(self, *args, **kwargs)


def _diverging(real_step, explode_from: int, nan_at: int):
    import jax.numpy as jnp

    def step(state, batch, rng, **kwargs):
        new_state, metrics = real_step(state, batch, rng, **kwargs)
        done = state.step + 1  # the step being trained, counted from 1
        loss = metrics["loss"] * jnp.where(done >= explode_from, 1e6, 1.0)
        return new_state, dict(metrics, loss=jnp.where(done >= nan_at, jnp.nan, loss))

    return step


def _sigterm_in_tokenizer(at: int) -> None:
    from flaxformer_lite.data import tokenizer

    real_next = tokenizer._Counted.__next__

    def next_or_sigterm(self):
        if self.count == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    tokenizer._Counted.__next__ = next_or_sigterm


if __name__ == "__main__":
    if "FAULT_SIGTERM_IN_TOKENIZER_AT" in os.environ:
        _sigterm_in_tokenizer(int(os.environ["FAULT_SIGTERM_IN_TOKENIZER_AT"]))
    if "FAULT_NAN_AT_STEP" in os.environ:
        explode = int(os.environ.get("FAULT_EXPLODE_FROM_STEP", 10**9))
        training.train_step = _diverging(training.train_step, explode, int(os.environ["FAULT_NAN_AT_STEP"]))
    atomicity.AtomicRenameTemporaryPath.finalize = _finalize_or_die
    if "FAULT_MAX_FILE_BYTES" in os.environ:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a dead process
        limit = int(os.environ["FAULT_MAX_FILE_BYTES"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    train.define_flags()
    app.run(train.main, flags_parser=cli.parse_flags)
