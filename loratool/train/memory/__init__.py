"""Patches that keep training light without changing what it learns (measured in docs/benchmarks.md)."""
