"""train.py end to end on the committed Bible fixture (tiny model, a few steps)."""

import json
import os
import shutil

import numpy as np
import pytest

from flaxformer_lite.train import loop, runtime
from tests import tiny_config


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A data dir and tokenizer prepared once for all runs in this module."""
    return str(tmp_path_factory.mktemp("shared"))


def _config(shared, **overrides):
    c = tiny_config.get_config()
    c.data_dir = os.path.join(shared, "tfds")
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _run(shared, workdir, **overrides):
    os.makedirs(workdir, exist_ok=True)
    spm = os.path.join(shared, "spm.model")
    if os.path.exists(spm):  # reuse the tokenizer trained by the first run
        shutil.copy(spm, os.path.join(workdir, "spm.model"))
    final = loop.train_and_evaluate(_config(shared, **overrides), workdir)
    if not os.path.exists(spm):
        shutil.copy(os.path.join(workdir, "spm.model"), spm)
    return final


def _train_curve(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def straight(shared, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, _run(shared, workdir)


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
def test_run_writes_everything_and_loss_falls(straight):
    workdir, final = straight
    for name in ("metrics.jsonl", "loss.png", "final_metrics.json", "spm.model"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [
        6,
        9,
        12,
    ]
    curve = _train_curve(workdir)
    assert sorted(curve) == list(range(1, 13))
    assert np.mean([curve[s] for s in (10, 11, 12)]) < np.mean([curve[s] for s in (1, 2, 3)])
    assert {"bleu", "chrf", "perplexity", "bleu_signature"} <= set(final)
    assert final["perplexity"] == pytest.approx(np.exp(final["nll"]))


def test_corrupt_latest_checkpoint_falls_back_to_previous(shared, straight, tmp_path, caplog):
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(straight[0], workdir)
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "12", "params")):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(max(os.path.getsize(os.path.join(root, f)) // 3, 1))
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    _run(shared, workdir, num_train_steps=13)
    assert "moved it to 12.corrupt-" in caplog.text and "resumed from step 9" in caplog.text
    assert sorted(_train_curve(workdir)) == [10, 11, 12, 13]  # resumed after step 9
    ckpts = os.listdir(os.path.join(workdir, "checkpoints"))
    assert [d for d in ckpts if d.startswith("12.corrupt-")] and "12" in ckpts  # kept aside, then redone


def test_checkpoint_of_another_architecture_is_a_clear_error(shared, straight, tmp_path):
    workdir = str(tmp_path / "mismatch")
    shutil.copytree(straight[0], workdir)
    overrides = dict(_config(shared).model.overrides, d_ff=48)
    # Named from the config saved with the checkpoint, before anything is restored (without a saved
    # config, the shapes are compared: test_checkpoint.py).
    msg = r"holds a run \(checkpoint of step \d+\) made with other settings: model.overrides.d_ff: 64 -> 48\."
    with pytest.raises(ValueError, match=msg):
        _run(shared, workdir, model=_model(overrides))


def _model(overrides):
    import ml_collections

    return ml_collections.ConfigDict({"preset": "transformer_base", "overrides": overrides})


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
def test_nan_at_a_step_stops_the_run_there_and_keeps_the_last_good_checkpoint(shared, tmp_path, monkeypatch):
    """Step 7 yields NaN (loss and params), as a poisoned batch would; nothing after 6 is saved."""
    import jax
    import jax.numpy as jnp

    from flaxformer_lite.train import training

    real_step = training.train_step

    def poisoned_step(state, batch, rng, **kwargs):
        new_state, metrics = real_step(state, batch, rng, **kwargs)
        nan = jnp.where(state.step == 6, jnp.nan, 0.0)  # state.step counts finished steps
        params = jax.tree.map(lambda p: p + nan.astype(p.dtype), new_state.params)
        return new_state.replace(params=params), dict(metrics, loss=metrics["loss"] + nan)

    monkeypatch.setattr(training, "train_step", poisoned_step)
    workdir = str(tmp_path / "nan")
    # Metrics are fetched every 5 steps and at checkpoints (every 3): the NaN of step 7 is seen at
    # step 9, before step 9 is saved.
    with pytest.raises(
        runtime.TrainingError,
        match=r"loss became nan at step 7; a rerun resumes from the last healthy checkpoint \(step 6",
    ):
        _run(shared, workdir, log_every=5)
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [3, 6]
    monkeypatch.setattr(training, "train_step", real_step)
    _run(shared, workdir)  # rerun: resumes from step 6 and finishes with finite losses
    assert np.all(np.isfinite(list(_train_curve(workdir).values())))


def test_too_little_disk_for_the_checkpoints_fails_before_training(shared, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: usage(1, 0, runtime.MIN_FREE_BYTES + 10))
    with pytest.raises(
        runtime.TrainingError, match=r"MiB free but 4 checkpoints of .* MiB need .*keep_checkpoints"
    ):
        _run(shared, str(tmp_path / "small_disk"))
    assert not os.path.exists(tmp_path / "small_disk" / "checkpoints")


def test_unwritable_workdir_fails_before_training(tmp_path, shared):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(runtime.TrainingError, match="is not writable"):
        loop.train_and_evaluate(_config(shared), str(blocker / "sub"))


def test_bad_config_values_name_the_field(shared, tmp_path):
    with pytest.raises(ValueError, match="batch_size=8 must be divisible by grad_accum_steps=3"):
        loop.train_and_evaluate(_config(shared, grad_accum_steps=3), str(tmp_path))
    with pytest.raises(ValueError, match="task='seq2seq'"):
        loop.train_and_evaluate(_config(shared, task="seq2seq"), str(tmp_path))


def test_eval_py_reports_bleu_that_sacrebleu_recomputes_from_its_files(shared, straight):
    import sacrebleu

    from flaxformer_lite.evaluation import run as eval_run

    workdir = straight[0]
    summary = eval_run.evaluate_workdir(
        _config(shared), workdir, "test", beams=2, alpha=0.6, max_examples=10, batch_size=8
    )
    out = os.path.join(workdir, "eval")
    prefix = summary["files"][: -len(".*")]
    assert os.path.dirname(prefix) == out and os.path.basename(prefix).startswith("bible_translate-en-de-")
    hyps = open(f"{prefix}.hyp.txt", encoding="utf-8").read().splitlines()
    refs = [open(f"{prefix}.ref{j}.txt", encoding="utf-8").read().splitlines() for j in range(2)]
    assert len(hyps) == 10 and all(len(r) == 10 for r in refs)
    assert summary["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score)
    assert summary["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, refs).score)
    assert summary["bleu_signature"].startswith("nrefs:2|")
    assert summary["bleu_per_reference"] == pytest.approx(
        [sacrebleu.corpus_bleu(hyps, [r]).score for r in refs]
    )
    assert json.load(open(f"{prefix}.json"))["perplexity"] == pytest.approx(summary["perplexity"])


def test_eval_without_checkpoint_is_a_clear_error(shared, tmp_path):
    from flaxformer_lite.evaluation import run as eval_run

    with pytest.raises(FileNotFoundError, match="no spm.model"):
        eval_run.evaluate_workdir(
            _config(shared), str(tmp_path), "test", beams=1, alpha=0.6, max_examples=2, batch_size=8
        )
    shutil.copy(os.path.join(shared, "spm.model"), tmp_path / "spm.model")
    with pytest.raises(FileNotFoundError, match="no checkpoints in .*train first"):
        eval_run.evaluate_workdir(
            _config(shared), str(tmp_path), "test", beams=1, alpha=0.6, max_examples=2, batch_size=8
        )


def test_generate_cli_translates_each_line_and_counts_bad_input(shared, straight):
    import io

    from flaxformer_lite.generation import interactive

    lines = ["In the beginning God created the heavens.\n", "\n", "word " * 200 + "\n", "Zeichen: 日本\n"]
    out, err = io.StringIO(), io.StringIO()
    counts = interactive.run(_config(shared), straight[0], lines, out, err, beam_size=2)
    assert {k: counts[k] for k in ("lines", "empty", "trimmed")} == {"lines": 4, "empty": 1, "trimmed": 1}
    assert counts["byte_fallback_tokens"] >= 2  # 日 and 本 are not in a 400-piece Bible vocabulary
    assert len(out.getvalue().split("\n")) == 5 and out.getvalue().split("\n")[1] == ""
    assert "1 empty lines, 1 lines trimmed" in err.getvalue()


@pytest.mark.parametrize("task", ["translation", "lm"])
def test_users_own_text_files_train_end_to_end(tmp_path, task):
    """tsv_translate / text_lm from a folder, bad lines skipped (and counted by the builder)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"sentence number {i} of the corpus\tSatz Nummer {i} des Korpus" for i in range(300)]
    if task == "lm":
        lines = [line.split("\t")[0] for line in lines]
    suffix = ".tsv" if task == "translation" else ".txt"
    (corpus / f"train{suffix}").write_bytes(("\n".join(lines[:250]) + "\n").encode() + b"\xff bad\n")
    (corpus / f"validation{suffix}").write_text("\n".join(lines[250:]) + "\n")
    config = tiny_config.get_config()
    config.update(
        task=task,
        dataset_name="tsv_translate" if task == "translation" else "text_lm",
        manual_dir=str(corpus),
        data_dir=str(tmp_path / "tfds"),
        vocab_size=300,
        num_train_steps=4,
        checkpoint_every=4,
        bleu_examples=4,
    )
    final = loop.train_and_evaluate(config, str(tmp_path / "work"))
    assert np.isfinite(final["nll"]) and (task == "lm" or "bleu" in final)


@pytest.mark.slow
def test_validation_beam_search_is_traced_once_for_every_evaluation(prepared, reference, monkeypatch):
    """valid_beam_size > 1 built a new jitted translate_fn at each validation: traced and compiled
    again every eval_every steps."""
    from flaxformer_lite import decoding
    from flaxformer_lite.train import experiment

    traced = []
    real = decoding.translate_outputs
    monkeypatch.setattr(decoding, "translate_outputs", lambda *a, **k: traced.append(1) or real(*a, **k))
    config = tiny_config.get_config()
    config.data_dir, config.valid_beam_size, config.bleu_examples, config.eval_batches = prepared[0], 2, 4, 1
    exp = experiment.build(config, reference, tokenizer="load")
    _, params = exp.restore_params()
    first = loop.evaluate(exp, params, with_bleu=True)
    once = len(traced)
    second = loop.evaluate(exp, params, with_bleu=True)
    assert len(traced) == once and first["bleu"] == second["bleu"]


def _eval_rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["step"] for r in rows if r["split"] == "eval"]


def test_valid_metric_scores_the_last_step_once(shared, tmp_path, monkeypatch):
    """The loop scores the last step (valid_metric) and the final evaluation reuses it: one
    evaluation and one eval row per scored step (the last one was evaluated twice, logged twice)."""
    calls = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    workdir = str(tmp_path / "metric")
    final = _run(shared, workdir, valid_metric="loss", eval_every=4, num_train_steps=8, checkpoint_every=4)
    assert len(calls) == 2 and _eval_rows(workdir) == [4, 8]
    assert "bleu" in final and final == json.load(open(os.path.join(workdir, "final_metrics.json")))


def test_a_stop_at_an_eval_step_still_evaluates_that_step(shared, tmp_path, monkeypatch):
    """A signal at step 4 (= eval_every) saves step 4 with its score; the rerun starts at 5, so an
    evaluation skipped there would never happen."""
    monkeypatch.setattr(
        runtime.StopRequests, "requested", lambda self, step, manager: "SIGTERM" if step == 4 else None
    )
    workdir = str(tmp_path / "stopped")
    with pytest.raises(runtime.Stopped, match="saved step 4 after SIGTERM"):
        _run(shared, workdir, valid_metric="loss", eval_every=4, num_train_steps=8, checkpoint_every=4)
    assert _eval_rows(workdir) == [4]
