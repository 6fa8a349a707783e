"""Benchmarks: scripts that print measured figures (run with python -m)."""
