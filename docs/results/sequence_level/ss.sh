#!/bin/bash
# Issue 31: scheduled sampling on the quickstart, two mixing schedules, equal steps (1,200) to the baseline.
set -x
export JAX_PLATFORMS=cpu
PY=.venv/bin/python
for spec in "a 0.25 1200" "b 0.5 600"; do
  set -- $spec
  uptime
  START=$(date +%s)
  $PY train.py --config=configs/quickstart.py --workdir=runs/ss_$1 --config.data_dir=runs/quickstart/tfds --config.scheduled_sampling_max_prob=$2 --config.scheduled_sampling_ramp_steps=$3 > runs/ss_$1.out 2>&1
  echo "ss_$1 train.py wall: $(( $(date +%s) - START )) s"
  uptime
  $PY eval.py --config=configs/quickstart.py --workdir=runs/ss_$1 --split=test 2>&1 | grep -v "^I1130\|^W1130" | tail -6
  $PY -m scripts.exposure_bias --config=configs/quickstart.py --workdir=runs/ss_$1 --split=test 2>&1 | grep -v "^I1130\|^W1130" | tail -1
done
