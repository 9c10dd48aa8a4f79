"""Interactive use of a trained model: text lines in (stdin), text lines out (stdout).

    echo "In the beginning was the Word." | python generate.py --config=configs/quickstart.py \
        --workdir=runs/quickstart                      # translation: beam search
    echo "And God said" | python generate.py --config=configs/gpt2_small.py --workdir=runs/lm \
        --temperature=0.8 --top_p=0.9                  # language model: sampled continuation
    echo "Hello, my dog" | python generate.py --hf_dir=path/to/gpt2   # a HuggingFace checkpoint
    echo "Hello" | python generate.py --hf_dir=path/to/opus-mt-en-de --length_penalty=hf --alpha=1

One output line per input line, always. Empty lines give empty outputs; lines longer than the
config's max_length are trimmed (forced --prefix targets to max_decode_length - 1 pieces); bytes that
are not UTF-8 are replaced; all are counted on stderr. A failed --plot_attention is an error after
every line is answered.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from flaxformer_lite import cli
from flaxformer_lite.generation import formatting, interactive


def define_flags() -> None:
    """Command-line flags (defined only when run as a script)."""

    config_flags.DEFINE_config_file("config", None, "The config the model was trained with.")
    flags.DEFINE_string("workdir", None, "The training workdir.")
    flags.DEFINE_integer("beam_size", 4, "Translation: beam size (1 = greedy).")
    flags.DEFINE_float("alpha", 0.6, "Translation: length-penalty exponent.")
    flags.DEFINE_enum(
        "length_penalty", "gnmt", ["gnmt", "hf"], "Translation: gnmt ((5+n)/6)**alpha or hf n**alpha."
    )
    flags.DEFINE_float("temperature", 0.0, "LM: sampling temperature (0 = greedy).")
    flags.DEFINE_integer("top_k", 0, "LM: sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "LM: nucleus sampling mass.")
    flags.DEFINE_integer(
        "max_new_tokens", 64, "Tokens to generate per prompt (--hf_dir: per translation too)."
    )
    flags.DEFINE_integer("seed", 0, "LM: sampling seed.")
    flags.DEFINE_string("hf_dir", None, "A transformers checkpoint dir (instead of config+workdir).")
    flags.DEFINE_string("checkpoint", "last", "last | best | averaged | STEP (as eval.py).")
    flags.DEFINE_enum(
        "weights", "auto", ["auto", "ema", "raw"], "ema: the params' moving average (auto: if kept)."
    )
    formatting.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.quiet_console()
    sample = dict(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
    try:
        if f.hf_dir:
            interactive.run_hf(
                f.hf_dir, sys.stdin.buffer, sys.stdout, max_new_tokens=f.max_new_tokens, seed=f.seed,
                beam_size=f.beam_size, alpha=f.alpha, length_penalty=f.length_penalty, **sample,
            )  # fmt: skip
            return
        if f.config is None or not f.workdir:
            raise ValueError(
                "pass --config and --workdir (a model trained here) or --hf_dir (an imported one)"
            )
        interactive.run(
            f.config, f.workdir, sys.stdin.buffer, sys.stdout, sys.stderr, seed=f.seed, beam_size=f.beam_size,
            alpha=f.alpha, max_new_tokens=f.max_new_tokens, length_penalty=f.length_penalty,
            checkpoint=f.checkpoint, weights=f.weights, shown=formatting.Shown.from_flags(f), **sample,
        )  # fmt: skip
    except cli.USER_ERRORS as e:
        cli.exit_with_error(e)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
