"""Benchmarks of aol_jax: each module runs as ``python -m benchmarks.<name>``."""
