"""Reproducible pipelines and benchmarks built on the minima library."""
