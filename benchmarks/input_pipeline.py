"""The input pipeline alone (no model): train batches of a config's shape per second, on real data.

    python -m benchmarks.input_pipeline --config=configs/quickstart.py --workdir=/tmp/ipb/quickstart
    python -m benchmarks.input_pipeline --config=configs/gpt2_small.py --workdir=/tmp/ipb/gpt2 --workers=0,2

The workdir's dataset is prepared and its tokenizer trained on first use (as train.py does; not
timed). Then, for each worker count, the train iterator is made, `--warmup` batches are drawn (worker
start-up, caches) and `--batches` more are timed. Reported per worker count: examples/s, tokens/s
(source + target tokens that are not padding), microseconds per example, and the same per busy host
core (the main process plus its workers, on a machine with at least that many cores). One JSON line
each.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from benchmarks.common import load_config, report

flags.DEFINE_string("config", "configs/quickstart.py", "Experiment config file.")
flags.DEFINE_string("workdir", None, "Workdir holding (or receiving) the prepared data and spm.model.")
flags.DEFINE_integer("batches", 200, "Timed batches.")
flags.DEFINE_integer("warmup", 10, "Batches drawn before timing.")
flags.DEFINE_list("workers", ["0"], "Worker process counts to measure (data_workers).")
flags.DEFINE_integer("batch_size", 0, "Override the config's global batch (0: keep).")
flags.DEFINE_integer("max_length", 0, "Override the config's max_length (0: keep).")
flags.DEFINE_multi_string("set", [], "Other config overrides, e.g. --set=pack=False.")
flags.DEFINE_string("label", "", "A label for the rows (e.g. 'before').")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def count(batch: dict) -> tuple[int, int]:
    """(examples, non-padding tokens) in a batch: segments are numbered 1.. per row, 0 = padding."""
    segments = batch["targets_segment_ids"]
    examples = int(segments.max(axis=1).sum())
    tokens = sum(int((batch[k] > 0).sum()) for k in batch if k.endswith("_segment_ids"))
    return examples, tokens


def measure(exp, batches: int, warmup: int) -> dict:
    it = iter(exp.train_dataset())
    for _ in range(warmup):
        next(it)
    examples = tokens = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        e, t = count(next(it))
        examples, tokens = examples + e, tokens + t
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "examples_per_sec": examples / wall,
        "tokens_per_sec": tokens / wall,
        "us_per_example": 1e6 * wall / examples,
        "tokens_per_example": tokens / examples,
        "main_process_cpu_fraction": cpu / wall,
        "wall_s": wall,
    }


def main(argv):
    del argv
    from flaxformer_lite.train import experiment

    config = load_config(FLAGS.config)
    if FLAGS.batch_size:
        config.batch_size = FLAGS.batch_size
    if FLAGS.max_length:
        config.max_length = FLAGS.max_length
    for item in FLAGS.set:
        key, value = item.split("=", 1)
        config[key] = type(config[key])(value) if not isinstance(config[key], bool) else value == "True"
    os.makedirs(FLAGS.workdir, exist_ok=True)
    for workers in map(int, FLAGS.workers):
        if "data_workers" in config:
            config.data_workers = workers
        elif workers:
            raise app.UsageError("this version of the pipeline has no data_workers")
        exp = experiment.build(config, FLAGS.workdir)
        figures = measure(exp, FLAGS.batches, FLAGS.warmup)
        cores = 1 + workers
        report(
            "input_pipeline",
            label=FLAGS.label,
            config=FLAGS.config,
            batch_size=config.batch_size,
            max_length=config.max_length,
            pack=bool(config.pack),
            workers=workers,
            host_cores=os.cpu_count(),
            load_avg=os.getloadavg()[0],
            tokens_per_sec_per_core=figures["tokens_per_sec"] / min(cores, os.cpu_count()),
            **{k: float(np.round(v, 3)) for k, v in figures.items()},
        )


if __name__ == "__main__":
    app.run(main)
