"""Patterns: pure index and mask maths, one file per pattern. No model code, no kernels."""
