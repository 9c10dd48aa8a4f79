"""What a translator reads besides the translation: n-best records, word alignments, attention maps.

Host-side formatting of `decoding.translate_outputs` results for generate.py (numpy in, text or
PNG out). Alignments and maps are over SentencePiece pieces, the units the model attends over.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from flaxformer_lite.decoding import ENSEMBLE_MODES, Attention, strip_after_eos

CELL = 0.35  # inches per source/target piece in an attention map
MARGIN_W, MARGIN_H = 0.9, 1.9  # inches around each panel: piece labels, title


@dataclasses.dataclass(frozen=True)
class Shown:
    """What generate.py prints besides each line's best output (its flags of the same names)."""

    nbest: int = 1  # hypotheses per source (<= beam size)
    output_format: str = "text"  # text | json
    ensemble: tuple[str, ...] = ()  # more workdirs decoded together with --workdir's model
    ensemble_mode: str = "log"  # log: mean of log-probs; prob: log of mean probabilities
    prefix: bool = False  # input lines are source<TAB>target prefix: the output continues the prefix
    alignment: bool = False  # Pharaoh pairs from one layer's cross-attention
    attention_layer: int = -1  # the layer alignments read (negative: from the last)
    attention_head: int = -1  # the head alignments and maps show (-1: their mean)
    plot_attention: str = ""  # a PNG of one sentence's cross-attention, per layer and averaged
    plot_line: int = 1  # the (1-based) input line to draw

    @classmethod
    def from_flags(cls, f) -> Shown:
        names = [x.name for x in dataclasses.fields(cls)]
        values = {n: getattr(f, n) for n in names}
        values["ensemble"] = tuple(d for d in values["ensemble"].split(",") if d)
        return cls(**values)

    @property
    def attention(self) -> Attention | None:
        """What decoding keeps: every layer's weights (head-averaged or one head), if any are shown."""
        if not (self.alignment or self.plot_attention):
            return None
        return Attention(layer=None, head=None if self.attention_head < 0 else self.attention_head)

    def check(self, *, translates: bool, beam_size: int) -> None:
        """Raise a ValueError naming the first bad option as its flag."""
        wants = [n for n in ("prefix", "alignment", "plot_attention") if getattr(self, n)]
        problems = (
            (self.nbest < 1, f"--nbest={self.nbest} must be at least 1"),
            (self.nbest > max(beam_size, 1), f"--nbest={self.nbest} needs --beam_size >= {self.nbest}"),
            (not translates and self.nbest > 1, "--nbest > 1 needs beam search, which is for translation"),
            (not translates and bool(wants), f"--{(wants or [''])[0]} is for translation models"),
            (
                self.output_format not in ("text", "json"),
                f"--output_format={self.output_format} is not text|json",
            ),
            (self.ensemble_mode not in ENSEMBLE_MODES, f"--ensemble_mode must be one of {ENSEMBLE_MODES}"),
            (self.plot_line < 1, f"--plot_line={self.plot_line} must be at least 1 (1 = the first line)"),
            (
                bool(self.plot_attention) and not os.path.isdir(os.path.dirname(self.plot_attention) or "."),
                f"--plot_attention={self.plot_attention}: its folder does not exist",
            ),
            (
                bool(self.plot_attention) and os.path.isdir(self.plot_attention),
                f"--plot_attention={self.plot_attention} is a folder: name the PNG file to write in it",
            ),
        )
        for bad, message in problems:
            if bad:
                raise ValueError(message)

    def attention_layer_names(self, model) -> list[str]:
        return [f"decoder layer {i}" for i in range(model.config.num_decoder_layers)]


def define_flags() -> None:
    """generate.py's flags for `Shown` (defined only when run as a script)."""
    from absl import flags

    flags.DEFINE_integer("nbest", 1, "Translation: print the K best hypotheses (K <= beam size) with scores.")
    flags.DEFINE_enum(
        "output_format", "text", ["text", "json"], "json: one object per line (scores, log-probs)."
    )
    flags.DEFINE_string(
        "ensemble", "", "More trained workdirs (comma-separated) decoded with --workdir's model."
    )
    flags.DEFINE_enum(
        "ensemble_mode", "log", list(ENSEMBLE_MODES), "Average log-probs (log) or probs (prob)."
    )
    flags.DEFINE_bool(
        "prefix", False, "Translation: lines are source<TAB>target prefix; continue the prefix."
    )
    flags.DEFINE_bool(
        "alignment", False, "Translation: print Pharaoh alignments (source-target piece pairs)."
    )
    flags.DEFINE_integer("attention_layer", -1, "The decoder layer alignments read (-1: the last).")
    flags.DEFINE_integer("attention_head", -1, "The cross-attention head shown (-1: the mean over heads).")
    flags.DEFINE_string("plot_attention", "", "Translation: draw --plot_line's cross-attention to this PNG.")
    flags.DEFINE_integer("plot_line", 1, "The input line (1-based) --plot_attention draws.")


def format_records(i: int, text: str, records: list[dict], shown: Shown) -> str:
    """One input line's output: JSON, the best text, or n-best lines "i ||| text ||| score"."""
    if shown.output_format == "json":
        return json.dumps({"source": text, "nbest": records}, ensure_ascii=False)
    if not records:
        return ""

    def extra(r):
        return f" ||| {r['alignment']}" if "alignment" in r else ""

    if shown.nbest == 1:
        return records[0]["text"].replace("\n", " ") + extra(records[0])
    return "\n".join(f"{i} ||| {r['text']} ||| {r['score']:.4f}{extra(r)}" for r in records)


def plot_sentence(path: str, out: dict, sp, source_ids: list[int], layer_names: list[str]) -> None:
    """`plot_attention` of the best hypothesis of the first source in a decoded batch `out`."""
    hyp = strip_after_eos(out["tokens"][0, :1])[0]
    steps = min(len(hyp) + 1, out["tokens"].shape[2])
    weights = np.asarray(out["attention"][0, 0, :steps, :, : len(source_ids)])
    pieces = [sp.id_to_piece(int(t)) for t in source_ids]
    target = [sp.id_to_piece(int(t)) for t in hyp] + ["</s>"]
    plot_attention(path, weights, pieces, target[:steps], layer_names=layer_names)


def pharaoh(weights: np.ndarray, *, source_len: int, target_len: int) -> str:
    """Pharaoh pairs "s-t ..." (0-based piece positions): each target piece t with the source piece
    it attends to most. weights [>= target_len, >= source_len]: one layer's (head-averaged or one
    head's) cross-attention per target step. EOS on either side is left out, as fairseq does."""
    w = np.asarray(weights)[:target_len, :source_len]
    if w.size == 0:
        return ""
    return " ".join(f"{int(s)}-{t}" for t, s in enumerate(np.argmax(w, axis=1)))


def nbest_records(out: dict, row: int, nbest: int, decode, alignment_layer: int | None = None,
                  source_len: int = 0) -> list[dict]:  # fmt: skip
    """JSON records of the `nbest` best hypotheses of one source `row` of a `translate_outputs` dict
    (numpy): text, penalised score, total and per-token log-probability (EOS included), and with
    alignment_layer set the Pharaoh alignment from that layer's attention."""
    records = []
    for k in range(min(nbest, out["tokens"].shape[1])):
        if not out["valid"][row, k]:
            continue
        ids = strip_after_eos(out["tokens"][row, k : k + 1])[0]
        steps = min(len(ids) + 1, out["tokens"].shape[2])  # the pieces and EOS
        rec = {
            "text": decode(ids),
            "score": round(float(out["scores"][row, k]), 5),
            "logp": round(float(out["logp"][row, k]), 5),
            "tokens": len(ids),
            "token_logp": [round(float(x), 4) for x in out["token_logp"][row, k, :steps]],
        }
        if alignment_layer is not None:
            weights = out["attention"][row, k, :, alignment_layer]
            rec["alignment"] = pharaoh(weights, source_len=source_len, target_len=len(ids))
        records.append(rec)
    return records


def figure_size(*, layers: int, source_len: int, target_len: int, cell: float = CELL) -> tuple[float, float]:
    """(width, height) in inches of `plot_attention`'s figure: one panel per layer, plus their mean."""
    panels = layers + (layers > 1)
    return panels * (source_len * cell + MARGIN_W), target_len * cell + MARGIN_H


def plot_attention(
    path: str,
    weights: np.ndarray,
    source: list[str],
    target: list[str],
    *,
    layer_names: list[str] | None = None,
    dpi: int = 120,
    cell: float = CELL,
) -> None:
    """Draw cross-attention [target_len, layers, source_len] of one sentence to a PNG: source
    pieces across, target pieces down, one panel per layer and one for their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = np.asarray(weights, np.float32)
    T, L, S = weights.shape
    if (T, S) != (len(target), len(source)):
        raise ValueError(
            f"attention is {T}x{S} but there are {len(target)} target and {len(source)} source pieces"
        )
    names = layer_names or [f"layer {i}" for i in range(L)]
    panels = [(weights[:, i], names[i]) for i in range(L)] + ([(weights.mean(1), "mean")] if L > 1 else [])
    size = figure_size(layers=L, source_len=S, target_len=T, cell=cell)
    fig, axes = plt.subplots(1, len(panels), figsize=size, dpi=dpi, squeeze=False)
    for ax, (w, title) in zip(axes[0], panels, strict=True):
        ax.imshow(w, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(S), source, rotation=90, fontsize=7)
        ax.set_yticks(range(T), target, fontsize=7)
        ax.set_title(title, fontsize=8)
    w, h = size
    fig.subplots_adjust(left=0.8 / w, right=1 - 0.1 / w, bottom=1.2 / h, top=1 - 0.4 / h, wspace=0.15)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
