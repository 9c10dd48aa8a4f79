"""Building an experiment, the train step, the loop, checkpoints, model selection, reports."""
