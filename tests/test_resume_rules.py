"""What a resumed or stopped run may and may not do (issue 27, items 2, 3 and 5), as a user meets it.

Real train.py processes on the committed fixture (tests/runs.py); the reference is the same
config's uninterrupted run. Plus the rules themselves, in-process, against closed forms.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import optax
import pytest

from flaxformer_lite.train import experiment, reporting
from tests import runs, tiny_config
from tests.runs import STEPS, TIMEOUT


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# ---- rules, in-process


def test_resume_changes_refuse_what_changes_the_run_and_allow_run_fields():
    saved = json.loads(tiny_config.get_config().to_json_best_effort())
    config = tiny_config.get_config()
    config.num_train_steps, config.log_every, config.mesh_fsdp = 40, 7, 2
    config.model.overrides.remat_policy = "full"
    refused, allowed = experiment.resume_changes(saved, config)
    assert refused == []
    assert allowed == [
        "log_every: 1 -> 7",
        "mesh_fsdp: 1 -> 2",
        "model.overrides.remat_policy: None -> 'full'",
        "num_train_steps: 12 -> 40",
    ]
    config.learning_rate, config.batch_size, config.vocab_size = 1e-3, 16, 300
    config.model.overrides.activation = "gelu"
    refused, _ = experiment.resume_changes(saved, config)
    assert refused == [
        "batch_size: 8 -> 16",
        "learning_rate: 0.003 -> 0.001",
        "model.overrides.activation: None -> 'gelu'",
        "vocab_size: 400 -> 300",
    ]


def test_extending_a_cosine_run_keeps_its_horizon_and_goes_on_at_the_final_rate():
    """Started for 30 steps, resumed for 50: the rate at 35 is the schedule's end (10% of the peak),
    not the 2.1e-3 of a cosine restarted over 50 steps."""
    config = tiny_config.get_config()
    config.schedule, config.learning_rate, config.warmup_steps, config.num_train_steps = "cosine", 5e-3, 5, 30
    exp = experiment.build(config, None, tokenizer="none", vocab_size=67)
    first = exp.for_resume(None)
    assert first.config.schedule_steps == 30
    saved = json.loads(first.config.to_json_best_effort())
    config.num_train_steps = 50
    resumed = experiment.build(config, None, tokenizer="none", vocab_size=67).for_resume(saved, 30)
    closed_form = optax.warmup_cosine_decay_schedule(0.0, 5e-3, 5, 30, end_value=5e-4)
    for step in (0, 10, 29, 30, 35, 49):
        assert float(resumed.schedule(step)) == pytest.approx(float(closed_form(step)), rel=1e-6)
    assert float(resumed.schedule(35)) == pytest.approx(5e-4)
    assert resumed.config.schedule_steps == 30  # saved with the next checkpoints: extending again keeps it
    config.schedule_steps = 50  # asking for another horizon explicitly changes the run: refused
    with pytest.raises(ValueError, match="schedule_steps: 30 -> 50"):
        experiment.build(config, None, tokenizer="none", vocab_size=67).for_resume(saved, 30)


def test_a_window_carried_over_a_stop_averages_the_same_steps(tmp_path, monkeypatch):
    losses = [4.0, 3.0, 2.0, 1.0]
    metrics = lambda loss: {"loss": loss, "tokens": 10.0}  # noqa: E731
    whole = reporting.MetricsWindow(0)
    for step, loss in enumerate(losses, 1):
        whole.add(step, metrics(loss))
    want = whole.sync(4, last_good=lambda: "")
    stopped = reporting.MetricsWindow(0)
    for step, loss in enumerate(losses[:3], 1):
        stopped.add(step, metrics(loss))
    assert stopped.peek(last_good=lambda: "") == {"loss": 3.0}
    stopped.save(str(tmp_path), 3)
    assert reporting.load_window(str(tmp_path), 2) == []  # resumed from another step: nothing carried
    resumed = reporting.MetricsWindow(3, carried=reporting.load_window(str(tmp_path), 3))
    resumed.add(4, metrics(losses[3]))
    got = resumed.sync(4, last_good=lambda: "")
    assert got["loss"] == want["loss"] == 2.5
    assert got["tokens_per_sec"] > 0  # from the one step this run timed


# ---- processes


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, shown",
    [
        ("--config.model.overrides.activation=gelu", "model.overrides.activation: None -> 'gelu'"),
        ("--config.learning_rate=0.001", "learning_rate: 0.003 -> 0.001"),
        # another optimizer-state tree: refused before orbax could fail to restore it (and every
        # checkpoint be taken for a corrupt one)
        ("--config.clip_norm=0.0", "clip_norm: 1.0 -> 0.0"),
    ],
)
def test_a_resume_that_would_change_the_run_is_one_line_and_changes_nothing(
    flag, shown, prepared, reference, tmp_path
):
    workdir = str(tmp_path / "changed")
    shutil.copytree(reference, workdir)
    before = runs.final_params(workdir)
    err = runs.finish(runs.start(workdir, prepared, flag, f"--config.num_train_steps={STEPS + 4}"), False)
    last = _last_line(err)
    assert last.startswith(f"error: workdir {workdir!r} holds a run (checkpoint of step {STEPS}) made with")
    assert shown in last and "start a new --workdir" in last and "Traceback" not in err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted(
        os.listdir(os.path.join(reference, "checkpoints"))
    )
    after = runs.final_params(workdir)
    assert all((after[k] == v).all() for k, v in before.items())


def _files(folder) -> dict:
    """{relative path: (size, mtime)} of the files under `folder`, but the log and the lock."""
    return {
        os.path.relpath(os.path.join(root, f), folder): os.stat(os.path.join(root, f))[6:9:2]
        for root, _, names in os.walk(folder)
        for f in names
        if not f.startswith(("train.", ".train."))
    }


@pytest.mark.slow
def test_a_resume_with_another_dataset_is_refused_before_anything_is_prepared(prepared, reference, tmp_path):
    """Before issue 38 the other corpus was prepared into <workdir>/tfds first, then refused."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.tsv").write_text("In the beginning\tIm Anfang\nGod said\tGott sprach\n")
    workdir = str(tmp_path / "other_data")
    shutil.copytree(reference, workdir)
    before = _files(workdir)
    other = ("--config.dataset_name=tsv_translate", f"--config.manual_dir={corpus}", "--config.data_dir=")
    err = runs.finish(runs.start(workdir, prepared, *other), expect_ok=False)
    last = _last_line(err)
    assert last.startswith(f"error: workdir {workdir!r} holds a run (checkpoint of step {STEPS}) made with")
    assert "dataset_name: 'bible_translate/en-de' -> 'tsv_translate'" in last, err[-2000:]
    assert f"manual_dir: '' -> '{corpus}'" in last and "Traceback" not in err
    assert _files(workdir) == before  # nothing prepared, trained or written


@pytest.mark.slow
def test_a_tokenizer_trained_with_another_vocab_size_is_not_reused(prepared, tmp_path):
    """The workdir's spm.model was trained here with vocab 400; asking for 300 is refused at once."""
    workdir = str(tmp_path / "vocab")
    os.makedirs(workdir)
    config = tiny_config.get_config()
    config.data_dir = prepared[0]
    experiment.build(config, workdir)  # trains spm.model and records its options beside it
    assert json.load(open(os.path.join(workdir, "spm.model.options.json")))["vocab_size"] == 400
    err = runs.finish(runs.start(workdir, prepared, "--config.vocab_size=300"), expect_ok=False)
    assert "vocab_size=400 there but 300 here" in _last_line(err) and "Traceback" not in err


@pytest.mark.slow
def test_a_corpus_with_no_usable_example_is_an_error_not_a_hang(prepared, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # Lines that prepare (two non-empty UTF-8 fields) but are nothing but control characters, which
    # SentencePiece's normalisation removes: every example is empty after tokenization.
    (corpus / "train.tsv").write_text("".join(f"\x01{chr(2 + i % 5)}\t\x03\n" for i in range(40)))
    (corpus / "validation.tsv").write_text("In the beginning\tIm Anfang\n")
    workdir = str(tmp_path / "empty")
    os.makedirs(workdir)
    start = time.time()
    proc = runs.start(
        workdir, prepared, "--config.dataset_name=tsv_translate", f"--config.manual_dir={corpus}"
    )  # fmt: skip
    err = runs.finish(proc, expect_ok=False)
    assert proc.returncode == 1 and time.time() - start < TIMEOUT
    last = _last_line(err)
    assert last.startswith("error: the train split has") and "none survives tokenization" in last, err[-2000:]


@pytest.mark.slow
def test_sigterm_outside_the_loop_stops_at_once_and_the_rerun_finishes(prepared, reference, tmp_path):
    """A signal while the run prepares (here: before its first step) stops it within seconds."""
    workdir = str(tmp_path / "early")
    proc = runs.start(workdir, prepared)
    log = os.path.join(workdir, "train.0.log")
    deadline = time.time() + TIMEOUT
    while not (os.path.exists(log) and "devices:" in open(log).read()) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    err = runs.finish(proc, expect_ok=False)
    assert time.time() - sent < 20
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert _last_line(err).startswith("SIGTERM received outside the training loop; stopped at once")
    runs.run(workdir, prepared)
    assert runs.curve(workdir) == runs.curve(reference)


@pytest.mark.slow
def test_sigterm_while_the_tokenizer_trains_exits_143_and_keeps_no_tokenizer(prepared, tmp_path):
    """Before issue 38: exit 1 with "SentencePiece training failed (... SIGTERM received ...). Adjust
    vocab_size"."""
    workdir = str(tmp_path / "tokenizer")
    os.makedirs(workdir)  # no spm.model: this run trains it
    proc = subprocess.Popen(
        runs.command(workdir, prepared), cwd=runs.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=runs.environment(FAULT_SIGTERM_IN_TOKENIZER_AT="50"),
    )  # fmt: skip
    err = runs.finish(proc, expect_ok=False)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert _last_line(err).startswith("SIGTERM received outside the training loop; stopped at once")
    assert "vocab_size" not in err and "Traceback" not in err
    assert not [f for f in os.listdir(workdir) if f.startswith("spm.model")]


@pytest.mark.slow
def test_rows_after_a_signal_stop_equal_the_uninterrupted_runs(prepared, tmp_path):
    """log_every 8, checkpoints every 4: a SIGTERM between rows, then a rerun, logs the same rows."""
    rows = ("--config.log_every=8",)
    whole = str(tmp_path / "whole")
    runs.run(whole, prepared, *rows)
    workdir = str(tmp_path / "stopped")
    proc = runs.start(workdir, prepared, *rows)
    ckpts = os.path.join(workdir, "checkpoints")
    deadline = time.time() + TIMEOUT
    while not (os.path.isdir(ckpts) and "4" in os.listdir(ckpts)) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = runs.finish(proc, expect_ok=False)
    stopped_at = int(_last_line(err).split()[2])
    runs.run(workdir, prepared, *rows)
    read = lambda w: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if not k.endswith("_per_sec") and k != "data_wait"}
        for line in open(os.path.join(w, "metrics.jsonl"))
    ]
    assert [r["step"] for r in read(workdir) if r["split"] == "train"] == [8, 16, 24]
    assert read(workdir) == read(whole), f"stopped at step {stopped_at}"
