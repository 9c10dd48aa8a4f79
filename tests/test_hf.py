"""HuggingFace interop against transformers itself: random-init models built locally, no download."""

import io
import json
import os
import re
import time

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxformer_lite import decoding, interop  # noqa: E402
from flaxformer_lite.model.models import DecoderOnly  # noqa: E402

pytestmark = pytest.mark.hf
V = 101  # a prime vocabulary, distinct from every width below


def _gpt2(tmp_path, **overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=V, n_positions=64, n_embd=48, n_layer=2, n_head=4, initializer_range=0.2)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, **overrides})).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _llama(tmp_path, **overrides):
    torch.manual_seed(0)
    config = dict(
        vocab_size=V,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA: 3 query heads per kv head
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # large enough that the logits differ visibly between tokens
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


BUILDERS = {"gpt2": _gpt2, "llama_gqa": _llama, "llama_tied": lambda p: _llama(p, tie_word_embeddings=True)}
TOKENS = np.random.RandomState(0).randint(0, V, (3, 29))


def _theirs(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_logits_equal_transformers(name, tmp_path):
    hf_model = BUILDERS[name](tmp_path)
    cfg, params = interop.from_hf(str(tmp_path))
    ours = DecoderOnly(cfg).apply({"params": params}, jnp.asarray(TOKENS))
    theirs = _theirs(hf_model, TOKENS)
    assert np.abs(theirs).max() > 1.0  # a meaningful comparison, not two near-zero tensors
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_greedy_20_tokens_equal_transformers_generate(name, tmp_path):
    hf_model = BUILDERS[name](tmp_path)
    cfg, params = interop.from_hf(str(tmp_path))
    prompt = TOKENS[:, :7]
    with torch.no_grad():
        want = hf_model.generate(
            torch.tensor(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, 7:].numpy()
    got = decoding.lm_generate(DecoderOnly(cfg), params, jnp.asarray(prompt), 20, start_id=None, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path):
    hf_model = BUILDERS[name](tmp_path / "original")
    cfg, params = interop.from_hf(str(tmp_path / "original"))
    interop.to_hf(params, cfg, str(tmp_path / "exported"))
    cls = type(hf_model)
    reloaded = cls.from_pretrained(str(tmp_path / "exported")).eval()
    np.testing.assert_allclose(_theirs(reloaded, TOKENS), _theirs(hf_model, TOKENS), atol=1e-5, rtol=0)


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "xlnet", "architectures": ["XLNetModel"]})
    )
    with pytest.raises(
        interop.UnsupportedCheckpointError,
        match=r"'xlnet' .*supported: gpt2, llama, mistral, marian, t5, bert",
    ):
        interop.from_hf(str(tmp_path))
    cfg = json.loads(
        json.dumps({"model_type": "llama", "hidden_act": "gelu", "rope_scaling": {"type": "yarn"}})
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(interop.UnsupportedCheckpointError, match=r"hidden_act='gelu', rope_scaling="):
        interop.from_hf(str(tmp_path))


def _set_config(path, **values):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **values}))


@pytest.mark.parametrize(
    "key, value",
    [("vocab_size", 10**12), ("n_layer", 2**11), ("n_head", 0), ("n_embd", 48.5), ("n_positions", True)],
)
def test_a_size_out_of_bounds_is_refused_naming_the_key_before_anything_is_built(key, value, tmp_path):
    """vocab_size=10**12 once gave an OverflowError traceback; n_layer=10**6 traced for hours (its
    command-line case is in test_damaged_files.py)."""
    _gpt2(tmp_path)
    _set_config(tmp_path, **{key: value})
    start = time.monotonic()
    with pytest.raises(
        ValueError, match=rf"config.json has {key}={value!r}, which is not a whole number from 1 to [\d,]+; "
    ):
        interop.from_hf(str(tmp_path))
    assert time.monotonic() - start < 5


def test_sizes_each_in_bounds_but_too_large_together_are_refused(tmp_path):
    _gpt2(tmp_path)
    v, d, n, f, p = 2**22, 2**16, 2**10, 2**18, 64
    _set_config(tmp_path, vocab_size=v, n_embd=d, n_layer=n, n_inner=f, n_positions=p)
    params = (v + p) * d + n * (4 * d * d + 2 * d * f)  # GPT-2's matrices (biases and norms aside)
    with pytest.raises(
        ValueError, match=f"config.json describes a model of about {re.escape(f'{params:.2e}')} "
    ):
        interop.from_hf(str(tmp_path))


def test_missing_tensors_are_listed(tmp_path):
    from safetensors.numpy import load_file, save_file

    _llama(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    for name in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        del tensors[name]
    save_file(tensors, path)
    with pytest.raises(
        interop.UnsupportedCheckpointError, match=r"lacks 2 tensors.*layers.1.mlp.up_proj.weight, lm_head"
    ):
        interop.from_hf(str(tmp_path))


def test_export_refuses_a_model_transformers_cannot_express(tmp_path):
    import flaxformer_lite as fl

    with pytest.raises(
        interop.UnsupportedCheckpointError,
        match=r"neither GPT-2-shaped \(.*\) nor LLaMA-shaped.*nor Marian-shaped",
    ):
        interop.to_hf({}, fl.transformer_base(num_encoder_layers=0), str(tmp_path))


def test_generate_cli_continues_prompts_like_transformers(tmp_path):
    """An imported checkpoint with its own tokenizer.json (a BPE trained here) through generate.py."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from flaxformer_lite.generation import interactive

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["In the beginning God created the heaven and the earth."] * 20 + [
        "And the earth was without form."
    ]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>"]))
    hf_model = _gpt2(tmp_path, vocab_size=tok.get_vocab_size(), eos_token_id=None, bos_token_id=None)
    tok.save(str(tmp_path / "tokenizer.json"))
    prompts = ["In the beginning", "", "And the earth"]
    out = io.StringIO()
    counts = interactive.run_hf(str(tmp_path), [p + "\n" for p in prompts], out, max_new_tokens=12)
    assert counts == {"lines": 3, "empty": 1, "trimmed": 0, "replaced_bytes": 0}
    lines = out.getvalue().split("\n")
    for prompt, line in zip(prompts, lines, strict=False):
        if not prompt:
            assert line == ""
            continue
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            new = hf_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[
                0, ids.shape[1] :
            ]
        assert line == tok.decode(new.tolist()).replace("\n", " ")


def test_loading_needs_neither_torch_nor_transformers(tmp_path):
    import subprocess
    import sys

    _llama(tmp_path)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from flaxformer_lite import interop\n"
        f"cfg, params = interop.from_hf({str(tmp_path)!r})\n"
        "assert cfg.num_kv_heads == 2 and 'logits' in params['decoder']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_generate_reads_a_sentencepiece_tokenizer_model(tmp_path, prepared):
    """tokenizer.model (SentencePiece, as LLaMA ships) instead of tokenizer.json."""
    import shutil

    import sentencepiece as spm

    from flaxformer_lite.generation import interactive

    sp = spm.SentencePieceProcessor(model_file=prepared[1])
    hf_model = _llama(tmp_path, vocab_size=sp.get_piece_size(), eos_token_id=None, bos_token_id=None)
    shutil.copy(prepared[1], tmp_path / "tokenizer.model")
    out = io.StringIO()
    interactive.run_hf(str(tmp_path), ["In the beginning God\n"], out, max_new_tokens=10)
    ids = torch.tensor([sp.encode("In the beginning God")])
    with torch.no_grad():
        new = hf_model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    assert out.getvalue() == sp.decode(new.tolist()).replace("\n", " ") + "\n"
