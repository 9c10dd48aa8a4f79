"""Bad input to the command-line tools: one line on stderr naming the problem and the fix, exit 1.

Each case runs the real script as a user would. A traceback or a multi-line error fails the test.
"""

import os
import subprocess
import sys

import pytest

from tests import runs

pytestmark = pytest.mark.slow


def _tsv_corpus(folder, validation_lines):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.tsv"), "wb") as f:
        f.write(b"In the beginning\tIm Anfang\n" * 40)
        f.write(b"bad \xff\xfe bytes\tnot utf-8\n")  # skipped and counted, not fatal
        f.write(b"x" * 30_000 + b"\ty\n")  # longer than any sentence: skipped and counted
    with open(os.path.join(folder, "validation.tsv"), "wb") as f:
        f.write(validation_lines)


CASES = {  # name: (script, extra flags, what the one line must say)
    "unknown config key": ("train.py", ["--config.batch_sise=8"], 'Did you mean "batch_size"'),
    "wrong type": ("train.py", ["--config.batch_size=eight"], "--config.batch_size=eight: invalid literal"),
    "missing config file": (
        "train.py",
        ["--config=configs/nope.py"],
        "cannot load --config: .*No such file or directory: 'configs/nope.py'",
    ),
    "bad config value": (
        "train.py",
        ["--config.grad_accum_steps=3"],
        "must be divisible by grad_accum_steps",
    ),
    "missing dataset": ("train.py", ["--config.dataset_name=nope/x"], "dataset 'nope/x' is not one of ours"),
    "empty eval split": (
        "train.py",
        ["--config.dataset_name=tsv_translate", "--config.manual_dir={tmp}/corpus"],
        "validation.tsv' has no usable lines .*1 not UTF-8",
    ),
    "eval of another architecture": (
        "eval.py",
        ["--workdir={reference}", "--config.model.overrides.d_ff=48"],
        r"parameter 'params/.*mlp/wi/bias' has shape \(64,\) in the checkpoint but \(48,\) in the model",
    ),
    "eval of an unknown split": ("eval.py", ["--workdir={reference}", "--split=dev"], "has no split 'dev'"),
    "eval without training": ("eval.py", [], "no spm.model in .*train.py run"),
    "generate without training": ("generate.py", [], "no spm.model in .*train.py run"),
    "generate from a non-checkpoint": ("generate.py", ["--hf_dir={tmp}"], "no config.json in .*transformers"),
    "generate with beam 0": (
        "generate.py",
        ["--workdir={reference}", "--beam_size=0"],
        "--beam_size=0 must be at least 1",
    ),
    "generate without workdir": ("generate.py", ["--workdir="], "pass --config and --workdir .* or --hf_dir"),
    "eval with beam -2": (
        "eval.py",
        ["--workdir={reference}", "--beam_size=-2"],
        "--beam_size=-2 must be at least 1",
    ),
    "eval with another activation": (
        "eval.py",
        ["--workdir={reference}", "--config.model.overrides.activation=gelu"],
        "trained with another model: activation='relu' in the checkpoint but 'gelu' here",
    ),
    "eval with max_examples -5": (
        "eval.py",
        ["--workdir={reference}", "--max_examples=-5"],
        "flag --max_examples=-5: -5 is not a non-negative integer",
    ),
    "eval with batch_size -1": (
        "eval.py",
        ["--workdir={reference}", "--batch_size=-1"],
        "flag --batch_size=-1: -1 is not a non-negative integer",
    ),
    "batch that does not split over the devices": (
        "train.py",
        ["--config.batch_size=12"],
        r"batch_size=12 .* does not split over the 8 devices .*use a multiple of 8",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line_and_exit_1(case, prepared, reference, tmp_path):
    import re

    script, extra, expected = CASES[case]
    _tsv_corpus(tmp_path / "corpus", b"\xff\xfe\n")  # validation: only a non-UTF-8 line
    fill = dict(tmp=tmp_path, reference=reference)
    args = [
        sys.executable,
        script,
        "--config=tests/tiny_config.py",
        f"--config.data_dir={tmp_path / 'tfds'}"
        if "manual_dir" in str(extra)
        else f"--config.data_dir={prepared[0]}",
        f"--workdir={tmp_path / 'work'}",
        *[x.format(**fill) for x in extra],
    ]
    proc = subprocess.run(
        args,
        cwd=runs.ROOT,
        env=runs.environment(),
        capture_output=True,
        text=True,
        timeout=runs.TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    log_line = re.compile(r"^[IWEF]\d{4} ")  # absl log records (library warnings) are not ours
    progress = ("train:", "Generating", "Shuffling")
    ours = [
        x
        for x in proc.stderr.splitlines()
        if x.strip() and not log_line.match(x) and not x.startswith(progress)
    ]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(ours) == 1 and ours[0].startswith("error: "), ours
    assert re.search(expected, ours[0]), ours[0]
    assert "''" not in ours[0] and len(ours[0]) < 600, ours[0]  # no stray quotes, no config dump


def test_errors_of_threads_and_finalizers_at_exit_stay_off_the_error_line(tmp_path):
    """CI once saw `RuntimeErrorerror: writing the checkpoint ...: Event loop is closed`: an event loop's
    finalizer printed into our line as the process went down. After `exit_with_error` such errors are
    logged (to the log file), and stderr holds exactly the one line."""
    script = tmp_path / "late_errors.py"
    script.write_text(
        "import logging, os, sys, threading\n"
        "from absl import logging as absl_logging\n"
        "from flaxformer_lite import cli\n"
        "absl_logging.use_absl_handler()  # the console handler, as app.run installs it\n"
        "logging.getLogger().addHandler(logging.FileHandler(sys.argv[1]))\n"
        "os._exit = lambda status: None  # keep running, to see where errors raised afterwards land\n"
        "cli.exit_with_error(OSError(27, 'File too large'))\n"
        "class Loop:\n"
        "    def __del__(self):\n"
        "        raise RuntimeError('Event loop is closed')\n"
        "loop = Loop(); del loop\n"
        "t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()\n"
    )
    log = tmp_path / "log.txt"
    proc = subprocess.run(
        [sys.executable, str(script), str(log)], cwd=runs.ROOT, env=runs.environment(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.stderr == "error: [Errno 27] File too large\n", proc.stderr
    logged = log.read_text()
    assert "Event loop is closed" in logged and "ZeroDivisionError" in logged, logged


def test_the_dataset_cli_prepares_a_corpus_where_train_py_reads_it(tmp_path):
    """`python -m flaxformer_lite.data.datasets tsv_translate --manual_dir=...` prepared into
    <data_dir>, where train.py never looks (it reads <data_dir>/source-<hash>), so train.py prepared it
    again."""
    from flaxformer_lite.data import datasets

    corpus, data_dir = str(tmp_path / "corpus"), str(tmp_path / "tfds")
    _tsv_corpus(corpus, b"In the end\tAm Ende\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flaxformer_lite.data.datasets", "tsv_translate", f"--manual_dir={corpus}",
         f"--data_dir={data_dir}"],
        cwd=runs.ROOT, env=runs.environment(), capture_output=True, timeout=runs.TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = datasets.prepared_dir(data_dir, manual_dir=corpus)  # what train.py opens for this corpus
    assert where != data_dir and os.path.isdir(os.path.join(where, "tsv_translate"))
    assert sorted(os.listdir(data_dir)) == [os.path.basename(where)]
    assert b"tsv_translate train: 40 examples" in proc.stdout
