"""A run on disk: its directory, checkpoints, plots, the report and the benchmarks."""
