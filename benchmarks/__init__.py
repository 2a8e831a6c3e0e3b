"""Benchmarks of mlet_dist (see the README)."""
