"""Corpus metrics with sacreBLEU (detokenized text in, the sacrebleu signature out)."""

from __future__ import annotations

import collections
import math

import sacrebleu


def bleu_and_chrf(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU and chrF. references[j][i] is the j-th reference of sentence i (sacrebleu's layout)."""
    if not hypotheses:
        raise ValueError("no hypotheses to score: the evaluation split is empty.")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, references)
    c = chrf.corpus_score(hypotheses, references)
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def perplexity(nll_sum: float, weight_sum: float) -> float:
    """exp(mean negative log-likelihood per non-pad token)."""
    if weight_sum <= 0:
        raise ValueError("no target tokens to compute perplexity on.")
    return math.exp(nll_sum / weight_sum)


def repetition_share(texts: list[str], n: int = 3, min_count: int = 3) -> float:
    """Share of texts in which some whitespace-token n-gram occurs at least `min_count` times:
    the degenerate loops of a decoder ("sondern der Vater, sondern der Vater, sondern der Vater")."""
    if not texts:
        return 0.0

    def loops(text: str) -> bool:
        words = text.split()
        grams = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        return any(c >= min_count for c in grams.values())

    return sum(loops(t) for t in texts) / len(texts)
