"""Interactive use of a trained model: text lines in (stdin), text lines out (stdout).

    echo "In the beginning was the Word." | python generate.py --config=configs/quickstart.py \
        --workdir=runs/quickstart                      # translation: beam search
    echo "And God said" | python generate.py --config=configs/gpt2_small.py --workdir=runs/lm \
        --temperature=0.8 --top_p=0.9                  # language model: sampled continuation
    echo "Hello, my dog" | python generate.py --hf_dir=path/to/gpt2   # a HuggingFace checkpoint

One output line per input line. Empty lines give empty outputs; lines longer than the config's
max_length are trimmed; both are counted on stderr.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from absl import app, flags

import eval as eval_lib
from flaxformer_lite import decoding, experiment
from flaxformer_lite import input_pipeline as ip


def define_flags() -> None:
    """Command-line flags (defined only when run as a script)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The config the model was trained with.")
    flags.DEFINE_string("workdir", None, "The training workdir.")
    flags.DEFINE_integer("beam_size", 4, "Translation: beam size (1 = greedy).")
    flags.DEFINE_float("alpha", 0.6, "Translation: GNMT length-penalty exponent.")
    flags.DEFINE_float("temperature", 0.0, "LM: sampling temperature (0 = greedy).")
    flags.DEFINE_integer("top_k", 0, "LM: sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "LM: nucleus sampling mass.")
    flags.DEFINE_integer("max_new_tokens", 64, "LM: tokens to generate per prompt.")
    flags.DEFINE_integer("seed", 0, "LM: sampling seed.")
    flags.DEFINE_string(
        "hf_dir", None, "A transformers GPT-2/LLaMA checkpoint dir (instead of config+workdir)."
    )
    flags.register_multi_flags_validator(
        ["config", "workdir", "hf_dir"],
        lambda v: bool(v["hf_dir"]) or (v["config"] is not None and bool(v["workdir"])),
        "pass --config and --workdir (a model trained here) or --hf_dir (an imported checkpoint)",
    )


def run(
    config,
    workdir: str,
    lines,
    out,
    err,
    *,
    beam_size=4,
    alpha=0.6,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    max_new_tokens=64,
    seed=0,
) -> dict:
    """Process `lines`, writing one line to `out` for each; returns counts of what was skipped or trimmed."""
    if config.task not in ("translation", "lm"):
        raise ValueError(f"generate.py handles task 'translation' or 'lm', not {config.task!r}.")
    sp, model, mesh, _, params = eval_lib.load(config, workdir)
    counts = {"lines": 0, "empty": 0, "trimmed": 0, "byte_fallback_tokens": 0}
    tokenize = ip.Tokenize(sp, {"inputs": "text"}, config.max_length)  # translation sources
    if config.task == "translation":
        decode = eval_lib.beam_decode_fn(model, beam_size, alpha, config.max_decode_length)
    else:
        decode = jax.jit(
            lambda p, x, k: decoding.lm_generate(
                model, p, x, max_new_tokens, rng=k, temperature=temperature, top_k=top_k, top_p=top_p
            )
        )
    for i, line in enumerate(lines):
        counts["lines"] += 1
        text = line.rstrip("\n")
        if not text.strip():
            counts["empty"] += 1
            out.write("\n")
            continue
        if config.task == "translation":
            ids = tokenize({"text": text})["inputs"]  # ids + EOS, trimmed and counted
            result = decode(params, jnp.zeros((1, config.max_length), jnp.int32).at[0, : len(ids)].set(ids))
        else:  # a prompt: no EOS, and a long one keeps its end
            ids = sp.encode(text)
            counts["byte_fallback_tokens"] += sum(sp.is_byte(t) for t in ids)
            if len(ids) > config.max_length:
                counts["trimmed"] += 1
                ids = ids[-config.max_length :]
            result = decode(params, jnp.array([ids], jnp.int32), jax.random.key(seed + i))
        out.write(sp.decode(decoding.strip_after_eos(result)[0]) + "\n")
        out.flush()
    counts["trimmed"] += tokenize.stats.trimmed
    counts["byte_fallback_tokens"] += tokenize.stats.byte_fallback_tokens
    if counts["empty"] or counts["trimmed"] or counts["byte_fallback_tokens"]:
        trimmed = f"{counts['trimmed']} lines trimmed to {config.max_length} tokens"
        unknown = f"{counts['byte_fallback_tokens']} byte-fallback tokens (characters outside the vocabulary)"
        err.write(f"{counts['empty']} empty lines, {trimmed}, {unknown}\n")
    return counts


def run_hf(hf_dir: str, lines, out, *, max_new_tokens=64, seed=0, **sample_kwargs) -> dict:
    """LM continuations of `lines` from a transformers checkpoint dir (with its tokenizer)."""
    import json
    import os

    from flaxformer_lite import interop
    from flaxformer_lite.models import DecoderOnly

    cfg, params = interop.from_hf(hf_dir)
    tok = interop.load_tokenizer(hf_dir)
    eos = json.load(open(os.path.join(hf_dir, "config.json"))).get("eos_token_id")
    eos = eos if isinstance(eos, int) else -1  # -1: generate max_new_tokens, never stop early
    model = DecoderOnly(cfg)
    decode = jax.jit(
        lambda p, x, k: decoding.lm_generate(
            model, p, x, max_new_tokens, start_id=None, rng=k, eos_id=eos, **sample_kwargs
        )
    )
    counts = {"lines": 0, "empty": 0, "trimmed": 0}
    for i, line in enumerate(lines):
        counts["lines"] += 1
        ids = tok.encode(line.rstrip("\n"))
        if not ids:
            counts["empty"] += 1
            out.write("\n")
            continue
        if len(ids) + max_new_tokens > cfg.max_len:  # keep the prompt's end within the positions
            counts["trimmed"] += 1
            ids = ids[-(cfg.max_len - max_new_tokens) :]
        new = [int(t) for t in decode(params, jnp.array([ids], jnp.int32), jax.random.key(seed + i))[0]]
        out.write(tok.decode(new[: new.index(eos)] if eos in new else new).replace("\n", " ") + "\n")
        out.flush()
    return counts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        if f.hf_dir:
            sample = dict(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
            run_hf(f.hf_dir, sys.stdin, sys.stdout, max_new_tokens=f.max_new_tokens, seed=f.seed, **sample)
            return
        run(
            f.config,
            f.workdir,
            sys.stdin,
            sys.stdout,
            sys.stderr,
            beam_size=f.beam_size,
            alpha=f.alpha,
            temperature=f.temperature,
            top_k=f.top_k,
            top_p=f.top_p,
            max_new_tokens=f.max_new_tokens,
            seed=f.seed,
        )
    except experiment.USER_ERRORS as e:
        experiment.exit_with_error(e)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=experiment.parse_flags)
