"""The names of the model presets (mmgpt/models/builder.py `PRESETS`), importable without torch.

Command-line parsers list them in their help (`mmgpt --help` must not import the model stack);
builder.py refuses to import if its table and this tuple ever differ.
"""
from __future__ import annotations

PRESET_NAMES: tuple[str, ...] = ("tiny", "demo", "small", "9b")


def preset_help() -> str:
    """`tiny | demo | small | 9b` for an argument's help."""
    return " | ".join(PRESET_NAMES)
