"""The word-overlap baseline (issue 41): its features by hand, its regression against Newton's method,
and on the fixture: near-perfect on bible_paraphrase, chance on bible_paraphrase/adversarial."""

import numpy as np
import pytest

from flaxformer_lite.evaluation import overlap_baseline
from tests import tiny_config


def test_features_equal_a_hand_worked_pair():
    # words: [the, cat, sat] and [the, cat, ran, away]; bigrams: 2 and 3, one shared
    got = overlap_baseline.features("The cat sat.", "the cat, ran away")
    np.testing.assert_allclose(got, [2 / 5, 1 / 4, 2 / 3, 2 / 4, 3 / 4])


def _newton(z, y, steps=30):
    """Logistic regression by Newton's method (another algorithm): (weights, bias)."""
    x = np.concatenate([z, np.ones((len(z), 1))], 1)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        hessian = x.T @ (x * (p * (1 - p))[:, None]) / len(y)
        w -= np.linalg.solve(hessian, x.T @ (p - y) / len(y))
    return w[:-1], w[-1]


def test_the_regression_converges_to_newtons_solution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * [1.0, 3.0, 0.5] + [0.0, 2.0, -1.0]
    y = (x @ [1.0, -0.5, 2.0] + 3 * rng.normal(size=400) > 0).astype(float)  # overlapping classes
    model = overlap_baseline.fit_logistic(x, y)
    w, b = _newton((x - model.mean) / model.std, y)
    np.testing.assert_allclose(model.weights, w, rtol=1e-3, atol=1e-3)
    assert model.bias == pytest.approx(b, abs=1e-3)


def test_word_overlap_solves_the_original_pairs_and_not_the_adversarial_ones(tmp_path):
    original, adversarial = "bible_paraphrase", "bible_paraphrase/adversarial"
    got = overlap_baseline.evaluate(
        str(tmp_path), original, (original, adversarial), db_path=tiny_config.FIXTURE
    )
    assert got[f"{original} test"]["word_overlap_logistic"]["accuracy"] >= 0.9
    adv = got[f"{adversarial} test"]
    n = adv["examples"]
    assert n >= 100 and abs(adv["word_overlap_logistic"]["accuracy"] - 0.5) <= 2.5 * 0.5 / np.sqrt(n)
    by_kind = adv["word_overlap_logistic"]["accuracy_by_kind"]
    assert by_kind["positive"] >= 0.9 and by_kind["swap_names"] <= 0.1  # swaps read as paraphrases
    few = overlap_baseline.evaluate(  # fit on the first 200 pairs only (the labelled-data curve)
        str(tmp_path), original, (original,), train_split="train[:200]", db_path=tiny_config.FIXTURE
    )
    assert few["trained_on"] == f"{original} train[:200] (200 pairs)"
    assert few["weights"] != got["weights"]
