"""Marian (opus-mt) interop against transformers itself: random-init models built here, no download.

Marian's vocabulary has padding last and EOS at 0; ours pad 0 and EOS 1. The import permutes
vocabulary rows (`interop.vocab_orders`), so every comparison maps ids through that order:
the test computes it independently from the config (pad first, EOS second, the rest in order).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxformer_lite import decoding, interop  # noqa: E402
from flaxformer_lite.model.models import EncoderDecoder  # noqa: E402

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


# ------------------------------------------------------------------ tokenizer, eval.py, generate.py

ENGLISH = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good.",
    "And God called the light Day, and the darkness he called Night.",
    "And the evening and the morning were the first day.",
]
GERMAN = [
    "Am Anfang schuf Gott Himmel und Erde.",
    "Und die Erde war wüst und leer.",
    "Und Gott sprach: Es werde Licht! und es ward Licht.",
    "Und Gott sah, daß das Licht gut war.",
    "Und Gott nannte das Licht Tag und die Finsternis Nacht.",
    "Da ward aus Abend und Morgen der erste Tag.",
]


def _marian_dir(path, eos_bias=0.0):
    """A Marian directory as opus-mt ships one: source.spm, target.spm, a joint vocab.json with
    </s> = 0, <unk> = 1 and <pad> last, and a random model over that vocabulary."""
    import io

    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    pieces = []
    for side, texts in (("source", ENGLISH), ("target", GERMAN)):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts * 5), model_writer=model, vocab_size=60, model_type="unigram",
            hard_vocab_limit=False, character_coverage=1.0, minloglevel=2,
        )  # fmt: skip
        (path / f"{side}.spm").write_bytes(model.getvalue())
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i)]
    words = ["</s>", "<unk>"] + sorted(set(pieces) - {"<unk>", "</s>", "<s>"})
    vocab = {w: i for i, w in enumerate(words + ["<pad>"])}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    global PAD
    size, pad = len(vocab), len(vocab) - 1
    old_pad, PAD = PAD, pad
    try:
        _marian(
            path,
            vocab_size=size,
            pad_token_id=pad,
            decoder_start_token_id=pad,
            init_std=0.2,
            eos_bias=eos_bias,
        )
    finally:
        PAD = old_pad
    return transformers.MarianMTModel.from_pretrained(
        path
    ).eval(), transformers.MarianTokenizer.from_pretrained(path)


def test_tokenizer_equals_transformers_marian_tokenizer(tmp_path):
    _, theirs = _marian_dir(tmp_path)
    ours = interop.load_tokenizer(str(tmp_path))
    order = interop.vocab_orders(json.load(open(tmp_path / "config.json")))["target"]
    for en, de in zip(
        ENGLISH + ["Unseen words: Zebra!"], GERMAN + ["Ungesehene Wörter: Zebra!"], strict=True
    ):
        want_src = theirs(en).input_ids  # ends in </s> (0); ours leaves EOS to the pipeline
        assert [int(order[i]) for i in ours.encode(en)] + [0] == want_src
        want_tgt = theirs(text_target=de).input_ids
        assert [int(order[i]) for i in ours.encode_targets(de)] + [0] == want_tgt
        assert ours.decode(np.argsort(order)[want_tgt]) == theirs.decode(want_tgt, skip_special_tokens=True)


def test_generate_and_eval_translate_with_an_imported_marian_like_transformers(tmp_path):
    """generate.py --hf_dir equals transformers' generate decoded by its tokenizer; eval.py --hf_dir
    on a test.tsv writes BLEU/chrF that sacrebleu recomputes from its own output files."""
    import subprocess
    import sys

    import sacrebleu

    from tests import runs

    hf_model, hf_tok = _marian_dir(tmp_path / "marian", eos_bias=2.0)
    sources = ENGLISH[:4]
    batch = hf_tok(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf_model.generate(
            **batch,
            num_beams=1,
            do_sample=False,
            max_new_tokens=20,
            forced_eos_token_id=None,
            bad_words_ids=None,
        )
    want = hf_tok.batch_decode(out, skip_special_tokens=True)
    assert len(set(want)) > 1 and all(w.strip() for w in want)  # varied, non-empty translations
    env, common = runs.environment(), [f"--hf_dir={tmp_path / 'marian'}", "--beam_size=1"]
    proc = subprocess.run(
        [sys.executable, "generate.py", *common, "--max_new_tokens=20"], input="\n".join(sources) + "\n",
        cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=runs.TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == want
    # References: two of the model's own outputs and two others, so BLEU lies strictly inside (0, 100).
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    refs = [want[0], want[1], GERMAN[2], GERMAN[3]]
    (corpus / "test.tsv").write_text("".join(f"{s}\t{r}\n" for s, r in zip(sources, refs, strict=True)))
    proc = subprocess.run(
        [sys.executable, "eval.py", "--config=tests/tiny_config.py", *common, f"--workdir={tmp_path / 'w'}",
         "--config.dataset_name=tsv_translate", f"--config.manual_dir={corpus}",
         f"--config.data_dir={tmp_path / 'tfds'}", f"--output_dir={tmp_path / 'out'}",
         "--config.max_length=64", "--config.max_decode_length=20"],
        cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=runs.TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (summary,) = [f for f in os.listdir(tmp_path / "out") if f.endswith(".test.json")]
    result = json.load(open(tmp_path / "out" / summary))
    prefix = tmp_path / "out" / summary.removesuffix(".json")
    hyps = open(f"{prefix}.hyp.txt").read().splitlines()
    srcs = open(f"{prefix}.src.txt").read().splitlines()  # the dataset's order, not the file's
    assert dict(zip(srcs, hyps, strict=True)) == dict(zip(sources, want, strict=True))  # same translations
    expected = sacrebleu.corpus_bleu(hyps, [open(f"{prefix}.ref0.txt").read().splitlines()])
    assert 0 < result["bleu"] < 100 and result["bleu"] == pytest.approx(expected.score, abs=1e-9)
    assert result["init_from_hf"] == str(tmp_path / "marian")


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
def test_train_fine_tunes_from_an_imported_marian(tmp_path):
    """train.py --config.init_from_hf starts from the imported weights: with learning rate 0 the
    checkpoint it saves translates exactly as transformers does (and eval.py reads it back)."""
    import subprocess
    import sys

    from tests import runs

    hf_model, hf_tok = _marian_dir(tmp_path / "marian", eos_bias=2.0)
    with torch.no_grad():
        out = hf_model.generate(
            **hf_tok(ENGLISH[:2], return_tensors="pt", padding=True), num_beams=1, do_sample=False,
            max_new_tokens=20, forced_eos_token_id=None, bad_words_ids=None,
        )  # fmt: skip
    want = hf_tok.batch_decode(out, skip_special_tokens=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pairs = "".join(f"{e}\t{g}\n" for e, g in zip(ENGLISH, GERMAN, strict=True))
    for split in ("train", "validation"):
        (corpus / f"{split}.tsv").write_text(pairs)
    (corpus / "test.tsv").write_text(
        "".join(f"{e}\t{g}\n" for e, g in zip(ENGLISH[:2], GERMAN[:2], strict=True))
    )
    config = [
        "--config=tests/tiny_config.py", f"--config.init_from_hf={tmp_path / 'marian'}",
        "--config.dataset_name=tsv_translate", f"--config.manual_dir={corpus}",
        f"--config.data_dir={tmp_path / 'tfds'}",
        "--config.max_length=64", "--config.max_decode_length=20", f"--workdir={tmp_path / 'w'}",
    ]  # fmt: skip
    run = lambda script, *extra: subprocess.run(  # noqa: E731
        [sys.executable, script, *config, *extra], cwd=runs.ROOT, env=runs.environment(),
        capture_output=True, text=True, timeout=runs.TIMEOUT,
    )  # fmt: skip
    proc = run(
        "train.py", "--config.num_train_steps=2", "--config.learning_rate=0", "--config.bleu_examples=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised from the transformers checkpoint" in open(tmp_path / "w" / "train.0.log").read()
    proc = run("eval.py", "--beam_size=1", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = [f for f in os.listdir(tmp_path / "out") if f.endswith(".test.json")]
    assert json.load(open(tmp_path / "out" / summary))["checkpoint_step"] == 2  # the fine-tuned checkpoint
    prefix = tmp_path / "out" / summary.removesuffix(".json")
    srcs = open(f"{prefix}.src.txt").read().splitlines()
    hyps = open(f"{prefix}.hyp.txt").read().splitlines()
    assert dict(zip(srcs, hyps, strict=True)) == dict(zip(ENGLISH[:2], want, strict=True))
