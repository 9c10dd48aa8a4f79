"""Text lines in, translations, continuations or labels out: what generate.py runs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import cli, decoding, files, sharding, tasks
from flaxformer_lite.evaluation import ensemble
from flaxformer_lite.generation import formatting
from flaxformer_lite.ids import EOS_ID
from flaxformer_lite.train import experiment


def run(
    config, workdir: str, lines, out, err, *, seed=0, checkpoint="last", weights="auto", shown=None, **options
) -> dict:
    """Process `lines` (str or bytes), writing one line to `out` for each; returns what was counted.

    shown: what to print besides the output text (`formatting.Shown`: n-best, JSON, alignments,
    attention map, forced prefixes, ensemble members).
    """
    decoding.check_options(**options)
    shown = shown or formatting.Shown()
    exp = experiment.build(config, workdir, tokenizer="load")
    if exp.task.classifies:  # "label<TAB>probabilities" per line, pairs as a<TAB>b (classify_metrics.py)
        from flaxformer_lite.evaluation import classify_metrics

        _, params = exp.restore_params(checkpoint=checkpoint, weights=weights)
        return classify_metrics.classify_lines(exp, params, lines, out, err)
    if not (exp.task.translates or exp.task.generates):
        raise ValueError(f"generate.py translates or continues text; task {exp.task.name!r} does neither.")
    shown.check(translates=exp.task.translates, beam_size=options.get("beam_size", 4))
    _, params = exp.restore_params(checkpoint=checkpoint, weights=weights)
    max_length = config.max_length
    counts = {"lines": 0, "empty": 0, "trimmed": 0, "byte_fallback_tokens": 0, "replaced_bytes": 0}
    tokenize = exp.tokenize(keys={"inputs": "text"})  # translation sources: ids + EOS, trimmed, counted
    models, params = [exp.inference_model], [params]
    if shown.ensemble:
        more = ensemble.load(exp, list(shown.ensemble), checkpoint=checkpoint, weights=weights)
        models, params = models + more[0], params + more[1]
    if exp.task.translates:
        counts["prefixes_trimmed"] = 0
        one = _translator(exp, models, params, tokenize, shown, options, counts)
    else:
        one = _continuer(exp, models, params, shown, counts, seed, options)
    for i, text in enumerate(cli.text_lines(lines, counts)):
        counts["lines"] += 1
        if not text.strip():
            counts["empty"] += 1
            out.write(
                json.dumps({"source": text, "nbest": []}) + "\n" if shown.output_format == "json" else "\n"
            )
        else:
            out.write(one(i, text) + "\n")
        out.flush()
    counts["trimmed"] += tokenize.stats.trimmed
    counts["byte_fallback_tokens"] += tokenize.stats.byte_fallback_tokens
    keys = ("empty", "trimmed", "byte_fallback_tokens", "replaced_bytes", "prefixes_trimmed")
    if any(counts.get(k) for k in keys):
        prefixes = (
            f", {counts['prefixes_trimmed']} forced prefixes trimmed to {config.max_decode_length - 1} tokens"
            if shown.prefix
            else ""
        )
        err.write(
            f"{counts['empty']} empty lines, {counts['trimmed']} lines trimmed to {max_length} tokens, "
            f"{counts['byte_fallback_tokens']} byte-fallback tokens (characters outside the vocabulary), "
            f"{counts['replaced_bytes']} bytes that were not UTF-8 replaced{prefixes}\n"
        )
    if counts.get("plot_error"):  # after every line is answered: a failed map loses no translation
        raise ValueError(
            f"drawing the attention map of line {shown.plot_line} to {shown.plot_attention!r} failed "
            f"({counts['plot_error']}); every line was translated"
        )
    return counts


def _translator(exp, models, params, tokenize, shown, options, counts):
    """`one(i, line) -> output text` for a translation model (or ensemble), per `shown`; forced
    prefixes trimmed and a failed attention map go into `counts`."""
    sp, config = exp.tokenizer, exp.config
    decode = tasks.translate_fn(
        models if len(models) > 1 else models[0], beam_size=options.get("beam_size", 4),
        alpha=options.get("alpha", 0.6), max_decode_length=config.max_decode_length,
        length_penalty=options.get("length_penalty", "gnmt"), outputs=True, attention=shown.attention,
        ensemble_mode=shown.ensemble_mode,
    )  # fmt: skip
    params = params if len(params) > 1 else params[0]
    layers = models[0].config.num_decoder_layers
    if shown.alignment and not -layers <= shown.attention_layer < layers:
        raise ValueError(f"--attention_layer={shown.attention_layer}: the model has {layers} decoder layers")

    def one(i, text):
        source, prefix = text.split("\t", 1) if shown.prefix and "\t" in text else (text, "")
        ids = tokenize({"text": source})["inputs"]  # ids + EOS
        row = np.zeros((1, config.max_length), np.int32)
        row[0, : len(ids)] = ids
        forced = None
        if shown.prefix:
            forced = np.zeros((1, config.max_decode_length), np.int32)
            pieces = getattr(sp, "encode_targets", sp.encode)(prefix)
            if len(pieces) > config.max_decode_length - 1:  # room for EOS
                counts["prefixes_trimmed"] += 1
                pieces = pieces[: config.max_decode_length - 1]
            forced[0, : len(pieces)] = pieces
        out = jax.device_get(decode(params, row) if forced is None else decode(params, row, forced))
        records = formatting.nbest_records(
            out, 0, shown.nbest, sp.decode, shown.attention_layer if shown.alignment else None, len(ids) - 1
        )
        if shown.plot_attention and i + 1 == shown.plot_line:
            try:
                formatting.plot_sentence(
                    shown.plot_attention, out, sp, ids, shown.attention_layer_names(models[0])
                )
            except Exception as e:  # noqa: BLE001  (reported once every line is answered)
                counts["plot_error"] = files.reason(e)
        return formatting.format_records(i, text, records, shown)

    return one


def _continuer(exp, models, params, shown, counts, seed, options):
    """`one(i, line) -> continuation` for a language model (or ensemble)."""
    sp, max_length = exp.tokenizer, exp.config.max_length
    sample = {k: options[k] for k in ("temperature", "top_k", "top_p") if k in options}
    max_new = options.get("max_new_tokens", 64)
    decode = jax.jit(
        sharding.under_rules(
            lambda p, x, k: decoding.lm_generate_outputs(
                models, p, x, max_new, rng=k, ensemble_mode=shown.ensemble_mode, **sample
            )
        )
    )

    def one(i, text):  # a prompt: no EOS, and a long one keeps its end
        ids = sp.encode(text)
        counts["byte_fallback_tokens"] += sum(sp.is_byte(t) for t in ids)
        if len(ids) > max_length:
            counts["trimmed"] += 1
            ids = ids[-max_length:]
        out = jax.device_get(decode(params, jnp.array([ids], jnp.int32), jax.random.key(seed + i)))
        out = {k: v[:, None] for k, v in out.items()}  # one hypothesis per prompt
        out["logp"], out["valid"] = out["token_logp"].sum(-1), np.ones((1, 1), bool)
        out["scores"] = out["logp"]
        return formatting.format_records(i, text, formatting.nbest_records(out, 0, 1, sp.decode), shown)

    return one


def run_hf(
    hf_dir: str,
    lines,
    out,
    *,
    max_new_tokens=64,
    seed=0,
    beam_size=4,
    alpha=0.6,
    length_penalty="gnmt",
    **sample_kwargs,
) -> dict:
    """Translations (Marian) or LM continuations of `lines` from a transformers checkpoint dir."""
    import json
    import os

    from flaxformer_lite import interop
    from flaxformer_lite.model.models import DecoderOnly, EncoderDecoder

    options = dict(beam_size=beam_size, alpha=alpha, length_penalty=length_penalty)
    decoding.check_options(max_new_tokens=max_new_tokens, **options, **sample_kwargs)
    cfg, params = interop.from_hf(hf_dir)
    tok = interop.load_tokenizer(hf_dir)
    if interop.model_class(cfg) is EncoderDecoder:
        return _translate_hf(EncoderDecoder(cfg), params, tok, lines, out, max_new_tokens, **options)
    eos = json.load(open(os.path.join(hf_dir, "config.json"))).get("eos_token_id")
    eos = eos if isinstance(eos, int) else -1  # -1: generate max_new_tokens, never stop early
    model = DecoderOnly(cfg)
    decode = jax.jit(
        sharding.under_rules(
            lambda p, x, k: decoding.lm_generate(
                model, p, x, max_new_tokens, start_id=None, rng=k, eos_id=eos, **sample_kwargs
            )
        )
    )

    def continuation(i, ids, counts):
        if len(ids) + max_new_tokens > cfg.max_len:  # keep the prompt's end within the positions
            counts["trimmed"] += 1
            ids = ids[-(cfg.max_len - max_new_tokens) :]
        new = [int(t) for t in decode(params, jnp.array([ids], jnp.int32), jax.random.key(seed + i))[0]]
        return new[: new.index(eos)] if eos in new else new

    return _answer_each(lines, out, tok, continuation)


def _translate_hf(model, params, tok, lines, out, max_new_tokens, *, beam_size, alpha, length_penalty):
    decode = tasks.translate_fn(
        model,
        beam_size=beam_size,
        alpha=alpha,
        max_decode_length=max_new_tokens,
        length_penalty=length_penalty,
    )
    max_len = model.config.max_len

    def translation(i, ids, counts):
        if len(ids) >= max_len:
            counts["trimmed"] += 1
            ids = ids[: max_len - 1]
        row = np.zeros((1, max_len), np.int32)
        row[0, : len(ids) + 1] = ids + [EOS_ID]
        return decoding.strip_after_eos(decode(params, row))[0]

    return _answer_each(lines, out, tok, translation)


def _answer_each(lines, out, tok, respond) -> dict:
    """One output line per input line: `respond(i, ids, counts)` gives the output ids; empty stays empty."""
    counts = {"lines": 0, "empty": 0, "trimmed": 0, "replaced_bytes": 0}
    for i, text in enumerate(cli.text_lines(lines, counts)):
        counts["lines"] += 1
        ids = tok.encode(text)
        if not ids:
            counts["empty"] += 1
            out.write("\n")
        else:
            out.write(tok.decode(respond(i, ids, counts)).replace("\n", " ") + "\n")
        out.flush()
    return counts
