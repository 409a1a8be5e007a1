"""Benchmark scripts: run `python bench/<name>.py` from the repo root (each has --quick)."""
