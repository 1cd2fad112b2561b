"""Names of logged metrics that one layer writes and another reads back from a run's files (reports)."""
TRAIN_SAMPLES_PER_SEC = "perf/train_samples_per_sec"
