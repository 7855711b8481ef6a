"""The names of the files on disk that mmgpt writes and reads back: a training output directory,
its checkpoints and an export directory. Training and export write them, inference, eval and the
model card read them, so every name is spelled once, here.

    OUT/config.yaml                    the resolved TrainConfig (model section included, absolute paths)
    OUT/ds_config.json                 the DeepSpeed config the run used (batch sizes filled in)
    OUT/adapter/                       the final peft adapter
    OUT/checkpoints/step_00000100/     one checkpoint: DeepSpeed files, adapter/, trained_with.json,
                                       manifest.json
    OUT/checkpoints/latest             the tag of the newest COMPLETE checkpoint
    OUT/tensorboard/                   TensorBoard events (the model card reads the final losses)
    OUT/train.log                      rank 0's log
    OUT/data_report.json               kept and dropped samples per source
    OUT/data_order/rank_000.jsonl      which samples each step used, per rank

    EXPORT/mmgpt_config.json           the ModelConfig that rebuilds the model (+ merged, dtype, image size)
    EXPORT/adapter/                    peft adapter + tokenizer
    EXPORT/language_model/             with --merge: HF LLaMA dir
    EXPORT/openflamingo/checkpoint.safetensors, checkpoint.pt    with --merge: OpenFlamingo layout
    EXPORT/README.md                   the model card
    EXPORT/manifest.json               sha256 of every file (mmgpt/manifest.py)

Neutral: imports only `configfile`, so training and inference share it without importing each other.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmgpt.configfile import ConfigError, read_mapping

# A training output directory
TRAIN_CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TENSORBOARD_DIR = "tensorboard"
TRAIN_LOG = "train.log"
DATA_REPORT = "data_report.json"
DATA_ORDER_DIR = "data_order"
# In each checkpoint (and the export): what it was trained with, and the hashes of its files
TRAINED_WITH = "trained_with.json"
MANIFEST = "manifest.json"
# peft's adapter file, in every adapter directory
ADAPTER_CONFIG = "adapter_config.json"
# An export directory
EXPORT_CONFIG = "mmgpt_config.json"
LANGUAGE_MODEL_DIR = "language_model"
OPENFLAMINGO_DIR = "openflamingo"
OPENFLAMINGO_FILE = "checkpoint.safetensors"
OPENFLAMINGO_PICKLE = "checkpoint.pt"  # the same tensors for OpenFlamingo's own torch.load
MODEL_CARD = "README.md"
# `mmgpt eval --update-card` (and users) edit the card after the export: its manifest entry is not checked.
UNVERIFIED = (MODEL_CARD,)

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


def order_log(out: Path, rank: int) -> Path:
    """One rank's data-order log (`train/checkpointing.py::open_order_log`)."""
    return out / DATA_ORDER_DIR / f"rank_{rank:03d}.jsonl"


def run_model_section(config_yaml: Path) -> dict[str, Any]:
    """The `model` mapping of a run's config.yaml, read without the rest of the training config
    (inference needs only the model; `TrainConfig.save` wrote every path in it absolute)."""
    model = read_mapping(config_yaml).get("model")
    if model is None:
        return {}
    if not isinstance(model, dict):
        raise ConfigError(f"{config_yaml}: model: expected a mapping, got {type(model).__name__}")
    return model
