import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from flax import linen as nn

import flaxformer_lite as fl
from flaxformer_lite import ops, sharding, tasks
from flaxformer_lite.data.tokenizer import EOS_ID, train_sentencepiece
from flaxformer_lite.evaluation import split_metrics
from tests import reference


def _batch():
    rng = np.random.default_rng(0)
    lengths = np.array([7, 4, 9, 2])
    valid = np.arange(9)[None] < lengths[:, None]
    tokens = np.where(valid, rng.integers(2, 31, (4, 9)), 0).astype(np.int32)
    seg = valid.astype(np.int32)
    pos = np.where(valid, np.arange(9)[None], 0).astype(np.int32)
    return {"targets": tokens, "targets_segment_ids": seg, "targets_positions": pos}


def test_perplexity_is_exp_of_mean_nll_over_real_tokens():
    model = fl.DecoderOnly(fl.tiny(vocab_size=31, deterministic=True))
    batch = _batch()
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(batch["targets"]))["params"])
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    got = split_metrics.evaluate_loss(params, model, tasks.LM, [batch], mesh)
    logits = model.apply({"params": params}, ops.shift_right(jnp.asarray(batch["targets"])))
    logp = reference.log_softmax(np.asarray(logits))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["targets_segment_ids"] > 0
    want = np.exp(nll[mask].mean())
    assert got["tokens"] == mask.sum() == 22
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)


class _Source(list):
    """A list that looks like a TFDS data source."""


def test_bleu_uses_every_reference_stream(tmp_path):
    texts = ["the cat sat on the mat", "a dog ran in the park today", "we all like green tea", "it rains"]
    sp = train_sentencepiece(iter(texts * 50), str(tmp_path / "m.model"), vocab_size=60, byte_fallback=False)
    source = _Source(
        {"en": f"src {i}".encode(), "de": t.encode(), "de_refs": [b"unrelated words here", t.encode()]}
        for i, t in enumerate(texts)
    )
    outputs = {}

    def decode_fn(params, inputs):  # "translates" sentence i into reference i (perfect), except the last
        rows = []
        for i in range(inputs.shape[0]):
            ids = sp.encode(texts[i]) if i < 3 else sp.encode("nothing like it")
            rows.append((ids + [EOS_ID] + [0] * 40)[:40])
        outputs["rows"] = rows
        return jnp.asarray(rows)

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    result = split_metrics.evaluate_bleu(
        None,
        None,
        sp,
        source,
        {"inputs": "en", "targets": "de"},
        max_examples=0,
        max_length=16,
        max_decode_length=20,
        batch_size=4,
        mesh=mesh,
        decode_fn=decode_fn,
    )
    hyps = texts[:3] + ["nothing like it"]
    refs = [["unrelated words here"] * 4, texts]
    assert result["hypotheses"] == hyps
    assert result["references"] == refs
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score)
    assert 0 < result["bleu"] < 100


def test_repetition_share_counts_texts_with_a_looping_3gram():
    from flaxformer_lite.evaluation import corpus_metrics

    texts = [
        "sondern der Vater, sondern der Vater, sondern der Vater, und",  # 3-gram x3: a loop
        "a b c a b c",  # twice only
        "the the the the the",  # ("the", "the", "the") occurs 3 times
        "",
    ]
    assert corpus_metrics.repetition_share(texts) == 0.5
    assert corpus_metrics.repetition_share(texts, min_count=2) == 0.75
    assert corpus_metrics.repetition_share([]) == 0.0


def _constraints(lowered) -> int:
    """Activation sharding constraints in a lowered program (Shardy's or GSPMD's spelling)."""
    text = lowered.as_text()
    return text.count("sdy.sharding_constraint") + text.count("@Sharding")


def test_eval_and_decode_programs_keep_the_models_activation_constraints():
    """The logical axis rules must be active when the eval and decode steps are traced: without them
    `nn.with_logical_constraint` is a no-op and, on a multi-device mesh, XLA picks the activations'
    shardings (the train step had the rules, these did not)."""
    model = fl.EncoderDecoder(fl.tiny(vocab_size=31, deterministic=True))
    mesh = sharding.make_mesh(2, 2, 2)  # data x fsdp x tensor over the 8 test devices
    inputs = jnp.ones((4, 9), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), inputs, inputs)["params"]))
    batch = {"inputs": inputs, "targets": inputs}
    for k in ("inputs", "targets"):
        batch |= {f"{k}_segment_ids": jnp.ones_like(inputs), f"{k}_positions": jnp.zeros_like(inputs)}
    with jax.set_mesh(mesh):
        programs = {
            "eval step": split_metrics._eval_step.lower(params, batch, model=model, task=tasks.TRANSLATION),
            "greedy": split_metrics._greedy_translate.lower(params, inputs, model=model, max_len=6),
            "beam": tasks.translate_fn(model, beam_size=2, alpha=0.6, max_decode_length=6).lower(
                params, inputs
            ),
        }
    assert {name: _constraints(p) > 0 for name, p in programs.items()} == dict.fromkeys(programs, True)
