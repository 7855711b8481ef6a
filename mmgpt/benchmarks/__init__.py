"""Benchmarks (`mmgpt bench ...`): CLIs that print and write JSON; targets live here, not in tests."""
