"""T5 interop against transformers itself: v1.0 (ReLU, rescaled tied head) and v1.1 (gated GELU)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxformer_lite import decoding, interop  # noqa: E402
from flaxformer_lite.model.models import EncoderDecoder  # noqa: E402

pytestmark = pytest.mark.hf
V = 101


def _t5(path, **overrides):
    torch.manual_seed(0)
    config = dict(
        vocab_size=V, d_model=24, d_kv=7, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=5,
        relative_attention_num_buckets=11, relative_attention_max_distance=20, initializer_factor=1.0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**config, **overrides}))
    with torch.no_grad():  # visible relative biases (init std is tiny)
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(std=2.0)
    model.save_pretrained(path, safe_serialization=True)
    return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


VARIANTS = {
    "v1_0": dict(feed_forward_proj="relu"),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # no rescale (tied in v5)
}
RNG = np.random.RandomState(0)
SOURCE = RNG.randint(2, V, (3, 30))  # longer than max_distance: far buckets matter
SOURCE[1, 21:] = 0
TARGET_IN = np.concatenate([np.zeros((3, 1), np.int64), RNG.randint(2, V, (3, 25))], axis=1)


def _theirs(model, source=SOURCE, target_in=TARGET_IN):
    with torch.no_grad():
        mask = torch.tensor(source != 0)
        return model(
            input_ids=torch.tensor(source), attention_mask=mask, decoder_input_ids=torch.tensor(target_in)
        ).logits.numpy()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_equal_transformers(name, tmp_path):
    hf_model = _t5(tmp_path, **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path))
    assert cfg.rescale_tied_logits == (name == "v1_0")
    ours = EncoderDecoder(cfg).apply({"params": params}, jnp.asarray(SOURCE), jnp.asarray(TARGET_IN))
    theirs = _theirs(hf_model)
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path):
    hf_model = _t5(tmp_path / "original", **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path / "original"))
    interop.to_hf(params, cfg, str(tmp_path / "exported"))
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "exported")).eval()
    np.testing.assert_allclose(_theirs(reloaded), _theirs(hf_model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_and_beam_equal_transformers_generate(name, tmp_path):
    # transformers' generate sizes its cache by the encoder's layer count: equal counts here.
    hf_model = _t5(tmp_path, num_decoder_layers=2, **VARIANTS[name])
    cfg, params = interop.from_hf(str(tmp_path))
    model, source = EncoderDecoder(cfg), jnp.asarray(SOURCE)

    def theirs(**options):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor(SOURCE), attention_mask=torch.tensor(SOURCE != 0), max_new_tokens=20,
                do_sample=False, decoder_start_token_id=0, **options,
            )[:, 1:].tolist()  # fmt: skip
        return [row[: row.index(1) + 1] if 1 in row else row for row in out]  # through EOS

    def ours(ids):
        return [row[: row.index(1) + 1] if 1 in row else row for row in np.asarray(ids).tolist()]

    assert ours(decoding.translate(model, params, source, 20)) == theirs(num_beams=1)
    beam = decoding.translate_beam(model, params, source, 20, beams=4, alpha=1.0, penalty="hf")
    assert ours(beam) == theirs(num_beams=4, length_penalty=1.0, early_stopping=False)
