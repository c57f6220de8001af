"""Tiny pipelines and models built in code for tests, the CLI default and benchmarks."""
