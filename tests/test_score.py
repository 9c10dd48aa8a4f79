"""Scoring given texts (flaxformer_lite.tools.score) against the uncached full forward and numpy."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import lm_compare
from flaxformer_lite.tools import score
from flaxformer_lite.train import experiment
from tests import tiny_config

PAIRS = [  # short: the tiny vocabulary (400 pieces) spends many pieces per word
    "God said.\tGott sprach.",
    "And it was so.\tUnd es geschah also.",
    "Jesus wept.\tJesus weinte.",
    "no tab here",
    "the first day\tder erste Tag",
]


def _numpy_log_p(model, params, batch_row: dict) -> float:
    """log P(target | source) of one unpacked example from the full forward, log-softmax in numpy."""
    tgt = np.asarray(batch_row["targets"])
    dec_in = np.concatenate([[0], tgt[:-1]])[None]
    args = (
        (jnp.asarray(batch_row["inputs"])[None], jnp.asarray(dec_in))
        if "inputs" in batch_row
        else (jnp.asarray(dec_in),)
    )
    logits = np.asarray(model.apply({"params": params}, *args)[0], np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return float(logp[np.arange(len(tgt)), tgt].sum())


def _translation_config(prepared):
    config = tiny_config.get_config()
    config.data_dir = prepared[0]
    config.pack, config.mesh_data, config.mesh_fsdp = False, 2, 4  # as the reference run
    return config


@pytest.mark.parametrize("max_segments", [None, 1])  # packed (several pairs per row) and unpacked
def test_pair_scores_equal_the_full_forward(reference, prepared, max_segments):
    config = _translation_config(prepared)
    if max_segments:
        config.model.overrides["max_segments"] = max_segments
    out, err = io.StringIO(), io.StringIO()
    counts = score.run(config, reference, PAIRS, out, err, output_format="json")
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rows) == len(PAIRS) and counts["unscored"] == 1
    assert "1 of 5 lines not scored (line 4: expected source<TAB>target" in err.getvalue()
    assert rows[3] == {"error": "expected source<TAB>target, got 1 field(s)"}
    exp = experiment.build(config, reference, tokenizer="load")
    _, params = exp.restore_params()
    params = jax.device_get(params)
    model = exp.inference_model
    for line, row in zip(PAIRS, rows, strict=True):
        if "error" in row:
            continue
        ex, _ = score.tokenize_line(exp, line)
        assert row["tokens"] == len(ex["targets"])
        assert row["logp"] == pytest.approx(_numpy_log_p(model, params, ex), abs=1e-3)
        assert row["perplexity"] == pytest.approx(np.exp(-row["logp"] / row["tokens"]), rel=1e-3)
    if max_segments is None:
        packed = score.pack({i: score.tokenize_line(exp, p)[0] for i, p in enumerate(PAIRS) if "\t" in p},
                            rows=8, max_length=config.max_length, max_segments=32)  # fmt: skip
        assert max(int(b["targets_segment_ids"].max()) for b in packed.batches) > 1  # really packed


def test_a_sentence_longer_than_max_length_is_reported_not_trimmed(reference, prepared):
    config = _translation_config(prepared)
    long = " ".join(["And the LORD spake unto Moses, saying"] * 12)
    out, err = io.StringIO(), io.StringIO()
    score.run(config, reference, [f"{long}\tKurz.", PAIRS[2]], out, err)
    first, second = out.getvalue().splitlines()
    assert first == "\t\t" and len(second.split("\t")) == 3
    assert "inputs has" in err.getvalue() and "more than max_length=32" in err.getvalue()


@pytest.mark.parametrize("max_segments", [32, 1])
def test_lm_scores_equal_the_full_forward(max_segments):
    config = lm_compare.get_config()
    config.model.overrides.update(d_model=32, num_heads=2, d_ff=64, num_decoder_layers=2)
    config.max_length, config.batch_size = 16, 8
    exp = experiment.build(config, None, tokenizer="none", vocab_size=50)
    params = nn.unbox(exp.inference_model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    examples = {
        i: {"targets": rng.integers(2, 50, size=rng.integers(2, 9)).tolist() + [1]} for i in range(11)
    }
    got = score.score_examples(exp, params, examples, batch_size=8, max_segments=max_segments)
    for i, ex in examples.items():
        assert got[i][1] == len(ex["targets"])
        assert got[i][0] == pytest.approx(_numpy_log_p(exp.inference_model, params, ex), abs=1e-3)
