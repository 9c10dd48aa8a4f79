"""BERT (BertForMaskedLM) interop against transformers itself: random-init models, no download."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxformer_lite import interop  # noqa: E402
from flaxformer_lite.model.models import EncoderOnly  # noqa: E402

pytestmark = pytest.mark.hf
V = 101


def _bert(path, **overrides):
    torch.manual_seed(0)
    config = dict(
        vocab_size=V, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=64, type_vocab_size=3, initializer_range=0.3, layer_norm_eps=1e-12,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(transformers.BertConfig(**{**config, **overrides}))
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # zero at init: make the output bias count
    model.save_pretrained(path, safe_serialization=True)
    return transformers.BertForMaskedLM.from_pretrained(path).eval()


RNG = np.random.RandomState(0)
TOKENS = RNG.randint(1, V, (3, 13))
TOKENS[2, 9:] = 0  # [PAD]
TYPES = (np.arange(13) >= 6).astype(np.int64)[None].repeat(3, 0) + np.array([[0], [1], [0]])  # A/B (and 2)
VARIANTS = {"gelu_tied": {}, "relu_untied": dict(hidden_act="relu", tie_word_embeddings=False)}


def _theirs(model):
    with torch.no_grad():
        mask = torch.tensor(TOKENS != 0)
        return model(
            torch.tensor(TOKENS), attention_mask=mask, token_type_ids=torch.tensor(TYPES)
        ).logits.numpy()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mlm_logits_equal_transformers(name, tmp_path):
    hf_model = _bert(tmp_path, **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path))
    mlm, _ = EncoderOnly(cfg).apply({"params": params}, jnp.asarray(TOKENS), token_types=jnp.asarray(TYPES))
    theirs = _theirs(hf_model)
    assert np.abs(theirs).max() > 1.0
    real = TOKENS != 0  # logits at [PAD] positions are not compared (their attention rows differ)
    np.testing.assert_allclose(np.asarray(mlm)[real], theirs[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path):
    hf_model = _bert(tmp_path / "original", **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path / "original"))
    interop.to_hf(params, cfg, str(tmp_path / "exported"))
    reloaded = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "exported")).eval()
    np.testing.assert_allclose(_theirs(reloaded), _theirs(hf_model), atol=1e-5, rtol=0)


def test_unsupported_bert_options_are_named(tmp_path):
    _bert(tmp_path, position_embedding_type="relative_key")
    with pytest.raises(interop.UnsupportedCheckpointError, match=r"position_embedding_type='relative_key'"):
        interop.from_hf(str(tmp_path))
