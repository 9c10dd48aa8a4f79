"""train.py with a fault injected, for tests/test_faults.py: python -m tests.fault_runner <train.py flags>.

FAULT_KILL_IN_COMMIT_OF_STEP=N: the process SIGKILLs itself while committing the checkpoint of
step N, after every file of it is written to orbax's temporary directory and before the rename
that makes it a checkpoint (the moment a crash is most likely to leave a half-made checkpoint).
FAULT_MAX_FILE_BYTES=N: no file may grow past N bytes (RLIMIT_FSIZE), so writes fail the way
they do on a full disk, with an OSError from the kernel.
"""

import os
import resource
import signal

from absl import app
from orbax.checkpoint._src.path import atomicity

import train
from flaxformer_lite import cli

KILL_STEP = os.environ.get("FAULT_KILL_IN_COMMIT_OF_STEP")
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _finalize_or_die(self, *args, **kwargs):
    if KILL_STEP is not None and self._final_path.name == KILL_STEP:
        with open(os.path.join(self.get(), "KILLED_HERE"), "w") as f:
            f.write("the runner killed itself before renaming this directory")
        os.kill(os.getpid(), signal.SIGKILL)
    return await _finalize(self, *args, **kwargs)


if __name__ == "__main__":
    atomicity.AtomicRenameTemporaryPath.finalize = _finalize_or_die
    if "FAULT_MAX_FILE_BYTES" in os.environ:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a dead process
        limit = int(os.environ["FAULT_MAX_FILE_BYTES"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    train.define_flags()
    app.run(train.main, flags_parser=cli.parse_flags)
