"""Held-out perplexity of whole documents with Transformer-XL memory M = 0, L, 2L, 4L (issue 39).

Scores a trained LM (RoPE, ALiBi or relative positions; the config saved in its workdir) with
`evaluation.memory.memory_perplexity` over the whole documents of a split, segment length
L = max_length, for each memory length, and
(as a cross-check of M = 0) the strided perplexity with stride = window = L. Prints a JSON line per
workdir.

    python train.py --config=configs/long_doc.py --workdir=runs/m128 \
        --config.model.overrides.position=rope --config.model.overrides.memory_length=128
    python -m benchmarks.long_doc_memory --workdir=runs/m128
"""

from __future__ import annotations

import argparse
import json
import time

import ml_collections

from flaxformer_lite.evaluation import long_documents
from flaxformer_lite.evaluation.memory import memory_perplexity
from flaxformer_lite.model.models import variant
from flaxformer_lite.train import experiment, init_from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--split", default="test")
    parser.add_argument("--memory", default="0,1,2,4", help="memory lengths in multiples of max_length")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    c = ml_collections.ConfigDict(init_from.saved_config(args.workdir))
    c.data_dir, c.long_document_strides = args.data_dir or c.data_dir, ""
    exp = experiment.build(c, args.workdir, tokenizer="load")
    step, params = exp.restore_params()
    source, feature = exp.data.open(args.split), exp.data.keys["targets"]
    streams = long_documents.document_streams(exp.tokenizer, (source[i][feature] for i in range(len(source))))
    documents = [s[1:] for s in streams]  # ids + EOS; memory_perplexity feeds BOS first itself
    L = c.max_length
    trained = exp.model.config.memory_length
    out = {"workdir": args.workdir, "step": step, "trained_memory": trained, "segment": L}
    for k in (int(x) for x in args.memory.split(",")):
        start = time.perf_counter()
        model = variant(exp.model, memory_length=k * L)
        r = memory_perplexity(model, params, documents, segment_length=L, batch_size=args.batch_size)
        r["seconds"] = round(time.perf_counter() - start, 1)
        out[f"M={k * L}"] = r
    strided = long_documents.evaluate(exp, params, args.split, window=L, strides=(L,))
    out["strided_window_stride_L"] = strided["strided"][str(L)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
