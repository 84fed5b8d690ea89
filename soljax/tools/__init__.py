"""Whole jobs built on the library: the demo (train, evaluate, report, sample) and the benchmarks."""
