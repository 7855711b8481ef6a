"""The layout of a training output directory, shared by training (which writes it) and inference
(which reads it): file names, checkpoint tags and the `latest` pointer.

    OUT/config.yaml                    the resolved TrainConfig (model section included)
    OUT/adapter/                       the final peft adapter
    OUT/checkpoints/step_00000100/     one checkpoint (adapter/ inside)
    OUT/checkpoints/latest             the tag of the newest COMPLETE checkpoint
"""
from __future__ import annotations

import re
from pathlib import Path

TRAIN_CONFIG = "config.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from or read; the message names the tag and the problem."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_tag(name: str) -> bool:
    return _TAG.match(name) is not None


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    if match is None:
        raise CheckpointError(f"not a checkpoint tag: {tag!r} (expected step_NNNNNNNN)")
    return int(match[1])


def read_latest(checkpoints: Path) -> str | None:
    """The tag `checkpoints/latest` points to, or None when there is no committed checkpoint."""
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    step_of(tag)
    if not (checkpoints / tag).is_dir():
        raise CheckpointError(f"{pointer} names {tag!r} but {checkpoints / tag} does not exist")
    return tag
