"""Benchmarks (`make bench`): speed and memory of the adapter methods, measured as ratios in one run."""
