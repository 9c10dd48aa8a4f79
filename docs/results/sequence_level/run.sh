#!/bin/bash
# Issue 31: MRT vs continued cross-entropy from the quickstart checkpoint, equal wall time (SIGTERM at T s).
set -x
export JAX_PLATFORMS=cpu
T=${T:-900}
PY=.venv/bin/python
COMMON="--config=configs/quickstart.py --config.init_from=runs/quickstart --config.num_train_steps=100000 --config.schedule=constant --config.learning_rate=2e-4 --config.log_every=10 --config.checkpoint_every=50 --config.eval_every=0 --config.bleu_examples=0"
uptime
$PY eval.py --config=configs/quickstart.py --workdir=runs/quickstart --split=test
uptime
timeout -s TERM $T $PY train.py $COMMON --workdir=runs/seq/mrt --config.objective=mrt --config.pack=False --config.mrt_source=beam --config.mrt_candidates=4
uptime
$PY eval.py --config=configs/quickstart.py --workdir=runs/seq/mrt --split=test
uptime
timeout -s TERM $T $PY train.py $COMMON --workdir=runs/seq/ce
uptime
$PY eval.py --config=configs/quickstart.py --workdir=runs/seq/ce --split=test
uptime
# Afterwards, equal updates instead of equal time: continued cross-entropy for MRT's 281 steps.
# $PY train.py $COMMON --workdir=runs/seq/ce281 --config.num_train_steps=281; $PY eval.py --config=configs/quickstart.py --workdir=runs/seq/ce281 --split=test
