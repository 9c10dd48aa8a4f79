"""Marian (opus-mt) interop against transformers itself: random-init models built here, no download.

Marian's vocabulary has padding last and EOS at 0; ours pad 0 and EOS 1. The import permutes
vocabulary rows (`interop.vocab_orders`), so every comparison maps ids through that order:
the test computes it independently from the config (pad first, EOS second, the rest in order).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxformer_lite import decoding, interop  # noqa: E402
from flaxformer_lite.models import EncoderDecoder  # noqa: E402

pytestmark = pytest.mark.hf
V, V_TARGET = 101, 89  # source (or shared) and separate target vocabularies: primes
PAD = 88  # inside both vocabularies (torch's Embedding needs it); Marian's EOS is 0


def _marian(path, *, activation="swish", shared=True, eos_bias=0.0, **overrides):
    torch.manual_seed(0)
    config = dict(
        vocab_size=V, d_model=24, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=0, decoder_start_token_id=PAD, activation_function=activation,
        init_std=0.3, scale_embedding=True,
    )  # fmt: skip
    if not shared:
        config.update(share_encoder_decoder_embeddings=False, decoder_vocab_size=V_TARGET)
    model = transformers.MarianMTModel(transformers.MarianConfig(**{**config, **overrides}))
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.5)
        model.final_logits_bias[0, 0] += eos_bias  # EOS this much likelier: hypotheses of many lengths
    model.save_pretrained(path, safe_serialization=True)
    # Compare with what a user loads (an unsaved separate-vocabulary model is not tied yet).
    return transformers.MarianMTModel.from_pretrained(path).eval()


def _order(size):
    return np.asarray([PAD, 0] + [i for i in range(size) if i not in (PAD, 0)])


RNG = np.random.RandomState(0)
SOURCE = RNG.randint(1, PAD, (3, 11))
SOURCE[1, 8:] = PAD  # a padded row
TARGET_IN = np.concatenate([np.full((3, 1), PAD), RNG.randint(1, PAD, (3, 6))], axis=1)
VARIANTS = {
    "swish_shared": dict(activation="swish"),
    "relu_shared": dict(activation="relu"),
    "swish_separate": dict(activation="swish", shared=False),
    "relu_separate_untied": dict(activation="relu", shared=False, tie_word_embeddings=False),
}


def _ours(cfg, params, source, target_in):
    """Our logits for HF-id inputs, in HF's vocabulary order."""
    src_order = _order(cfg.source_vocab_size or cfg.vocab_size)
    tgt_order = _order(cfg.vocab_size)
    to_ours = lambda ids, order: np.argsort(order)[ids]  # noqa: E731
    logits = EncoderDecoder(cfg).apply(
        {"params": params},
        jnp.asarray(to_ours(source, src_order)),
        jnp.asarray(to_ours(target_in, tgt_order)),
    )
    return np.asarray(logits)[..., np.argsort(tgt_order)]


def _theirs(model, source, target_in):
    with torch.no_grad():
        mask = torch.tensor(source != PAD)
        return model(
            input_ids=torch.tensor(source), attention_mask=mask, decoder_input_ids=torch.tensor(target_in)
        ).logits.numpy()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_equal_transformers(name, tmp_path):
    hf_model = _marian(tmp_path, **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path))
    assert (cfg.source_vocab_size is None) == VARIANTS[name].get("shared", True)
    theirs = _theirs(hf_model, SOURCE, TARGET_IN)
    assert np.abs(theirs).max() > 1.0  # a meaningful comparison, not two near-zero tensors
    ours = _ours(cfg, params, SOURCE, TARGET_IN)
    np.testing.assert_allclose(ours[[0, 2]], theirs[[0, 2]], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-4, rtol=0)  # the padded source


@pytest.mark.parametrize("name", ["swish_shared", "relu_separate_untied"])
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path):
    hf_model = _marian(tmp_path / "original", **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path / "original"))
    interop.to_hf(
        params, cfg, str(tmp_path / "exported"), special_ids={"pad_token_id": PAD, "eos_token_id": 0}
    )
    reloaded = transformers.MarianMTModel.from_pretrained(str(tmp_path / "exported")).eval()
    exported = json.load(open(tmp_path / "exported" / "config.json"))
    assert (exported["pad_token_id"], exported["decoder_start_token_id"], exported["eos_token_id"]) == (
        PAD,
        PAD,
        0,
    )
    np.testing.assert_allclose(
        _theirs(reloaded, SOURCE, TARGET_IN), _theirs(hf_model, SOURCE, TARGET_IN), atol=1e-5, rtol=0
    )


def _hf_generate(model, **options):
    with torch.no_grad():
        out = model.generate(
            torch.tensor(SOURCE), attention_mask=torch.tensor(SOURCE != PAD), max_new_tokens=20,
            do_sample=False, forced_eos_token_id=None, bad_words_ids=None, **options,
        )[:, 1:].numpy()  # fmt: skip
    return [row[: list(row).index(0) + 1] if 0 in row else row for row in out.tolist()]  # through EOS


def _ours_through_eos(ids, order):
    rows = []
    for row in order[np.asarray(ids)].tolist():  # back to HF ids
        rows.append(row[: row.index(0) + 1] if 0 in row else row)
    return rows


# EOS biases (found by trying) that make these random models end some outputs early, not all at once.
@pytest.mark.parametrize("name,eos_bias", [("swish_shared", 2.8), ("relu_separate_untied", 0.6)])
def test_greedy_20_tokens_equal_transformers_generate(name, eos_bias, tmp_path):
    hf_model = _marian(tmp_path, eos_bias=eos_bias, init_std=0.2, **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path))
    source = jnp.asarray(np.argsort(_order(cfg.source_vocab_size or cfg.vocab_size))[SOURCE])
    got = decoding.translate(EncoderDecoder(cfg), params, source, 20)
    want = _hf_generate(hf_model, num_beams=1)
    assert any(row[-1] == 0 for row in want) and any(len(row) > 3 for row in want)  # EOS, not only at once
    assert _ours_through_eos(got, _order(cfg.vocab_size)) == want


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_beam_search_with_hf_length_penalty_equals_generate_num_beams_4(alpha, tmp_path):
    hf_model = _marian(tmp_path, eos_bias=2.8, init_std=0.2)
    cfg, params = interop.from_hf(str(tmp_path))
    source = jnp.asarray(np.argsort(_order(cfg.vocab_size))[SOURCE])
    got = decoding.translate_beam(EncoderDecoder(cfg), params, source, 20, beams=4, alpha=alpha, penalty="hf")
    want = _hf_generate(hf_model, num_beams=4, length_penalty=alpha, early_stopping=False)
    assert len({len(row) for row in want}) > 1  # hypotheses of different lengths: the penalty matters
    assert _ours_through_eos(got, _order(cfg.vocab_size)) == want
