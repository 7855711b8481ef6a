"""Benchmarks (`mmgpt bench ...`): CLIs that print and write JSON; speed targets live here."""
