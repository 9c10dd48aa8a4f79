"""Command-line tools: ahead-of-time compiles for TPU/GPU targets, checkpoint averaging, scoring."""
