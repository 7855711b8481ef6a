"""Find and load a trained model from any directory a user has: a training output dir, its
adapter dir, or an export dir (adapter-only or merged).

Shared by `mmgpt export`, `mmgpt chat` and `mmgpt serve`, so all three accept the same paths and
build the model the same way: the source's ModelConfig (random presets are rebuilt bit-identically
from their seed) plus either the peft adapter, loaded with plain `PeftModel.from_pretrained` onto
our lang_encoder, or the merged export's own LLaMA directory and OpenFlamingo checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from mmgpt.configfile import from_dict
from mmgpt.manifest import ManifestError, Mismatch, first_mismatch, read_manifest
from mmgpt.models.builder import MODEL_PATH_FIELDS, BuiltModel, ModelConfig, build_model
from mmgpt.names import DTYPE_NAMES
from mmgpt.run_layout import (ADAPTER_CONFIG, ADAPTER_DIR, CHECKPOINTS_DIR, EXPORT_CONFIG, LANGUAGE_MODEL_DIR, LATEST,
                              MANIFEST, OPENFLAMINGO_DIR, OPENFLAMINGO_FILE, TRAIN_CONFIG, UNVERIFIED, read_latest,
                              run_model_section)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
if sorted(DTYPES) != sorted(DTYPE_NAMES):  # the parsers offer DTYPE_NAMES without importing this module
    raise RuntimeError(f"mmgpt/names.py lists {DTYPE_NAMES}, model_dir.DTYPES has {tuple(DTYPES)}")
# Runs and exports written before `media_attention` existed were trained with "previous" semantics.
LEGACY_MEDIA_ATTENTION = "previous"


@dataclass
class ModelSource:
    """What a directory holds: the model config and where the trained weights are."""

    path: Path  # the directory the user named
    kind: str  # "train" | "checkpoint" | "adapter" | "export-adapter" | "export-merged"
    model_config: ModelConfig  # the source model (before any merge)
    adapter_dir: Path | None  # peft adapter directory (None for a merged export)
    merged_dir: Path | None = None  # the export dir holding language_model/ + openflamingo/


def model_config_from_dict(data: dict[str, Any], where: Path) -> ModelConfig:
    """ModelConfig from a mapping, typed like every config file (a typo must not silently default)."""
    if isinstance(data, dict) and "media_attention" not in data:
        data = {**data, "media_attention": LEGACY_MEDIA_ATTENTION}
    return from_dict(ModelConfig, data, f"{where}: model")


def _train_model_config(path: Path) -> ModelConfig:
    """The model section of a training run's resolved config.yaml (relative paths, which only a
    hand edit leaves there, are relative to its folder, as for `TrainConfig.load`)."""
    section = run_model_section(path)
    base = path.resolve().parent
    section = {key: str((base / value).resolve()) if key in MODEL_PATH_FIELDS and isinstance(value, str) else value
               for key, value in section.items()}
    return model_config_from_dict(section, path)


def _export_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path}: expected an mmgpt export config with a 'model' section")
    return data


def _nearest_config(path: Path) -> ModelConfig:
    """An adapter or checkpoint dir has no model config: take it from the run or export above it
    (OUT/adapter, OUT/checkpoints/<tag>, OUT/checkpoints/<tag>/adapter)."""
    for parent in list(path.resolve().parents)[:3]:
        if (parent / EXPORT_CONFIG).is_file():
            return model_config_from_dict(_export_config(parent / EXPORT_CONFIG)["model"], parent / EXPORT_CONFIG)
        if (parent / TRAIN_CONFIG).is_file():
            return _train_model_config(parent / TRAIN_CONFIG)
    raise FileNotFoundError(f"{path}: adapter found but no {EXPORT_CONFIG} or {TRAIN_CONFIG} above it "
                            "to say which base model it adapts")


def _train_adapter(run: Path) -> Path:
    """A training run's weights: the adapter of the checkpoint `checkpoints/latest` names (the
    newest complete state, even while a resumed run is going), else OUT/adapter."""
    tag = read_latest(run / CHECKPOINTS_DIR)
    if tag is not None:
        return _adapter_in(run / CHECKPOINTS_DIR / tag / ADAPTER_DIR)
    if (run / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return run / ADAPTER_DIR
    raise FileNotFoundError(f"{run}: training output has no {CHECKPOINTS_DIR}/{LATEST} and no {ADAPTER_DIR}/ yet")


def resolve_source(path: str | Path) -> ModelSource:
    """Classify `path` and find its config and weights; errors name what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if (path / EXPORT_CONFIG).is_file():
        data = _export_config(path / EXPORT_CONFIG)
        cfg = model_config_from_dict(data["model"], path / EXPORT_CONFIG)
        if data.get("merged"):
            for need in (path / LANGUAGE_MODEL_DIR, path / OPENFLAMINGO_DIR / OPENFLAMINGO_FILE):
                if not need.exists():
                    raise FileNotFoundError(f"{path}: merged export is missing {need}")
            return ModelSource(path, "export-merged", cfg, None, merged_dir=path)
        return ModelSource(path, "export-adapter", cfg, _adapter_in(path / ADAPTER_DIR))
    if (path / TRAIN_CONFIG).is_file():
        return ModelSource(path, "train", _train_model_config(path / TRAIN_CONFIG), _train_adapter(path))
    if (path / ADAPTER_CONFIG).is_file():
        return ModelSource(path, "adapter", _nearest_config(path), path)
    if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return ModelSource(path, "checkpoint", _nearest_config(path), path / ADAPTER_DIR)
    raise FileNotFoundError(f"{path}: not a model directory (expected {EXPORT_CONFIG}, {TRAIN_CONFIG}, "
                            f"{ADAPTER_CONFIG} or {ADAPTER_DIR}/{ADAPTER_CONFIG})")


def _adapter_in(adapter_dir: Path) -> Path:
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"no peft adapter at {adapter_dir} ({ADAPTER_CONFIG} missing)")
    return adapter_dir


class ExportIntegrityError(ValueError):
    """An export's file does not match its manifest.json (truncated, altered, missing)."""


def verify_export(source: ModelSource, full: bool = False) -> str | None:
    """Check an export against the manifest.json written with it, before any weight is read:
    every listed file's size but the model card's always (a stat each: catches truncation, which
    safetensors reports only as a traceback), and with `full` its sha256 (reads every byte: catches altered bytes).
    Returns what was checked, None for a source that is no export; raises naming the file."""
    if not source.kind.startswith("export"):
        return None
    manifest = source.path / MANIFEST
    try:
        listed = read_manifest(source.path)
    except FileNotFoundError:
        raise ExportIntegrityError(f"{manifest}: missing; the export cannot be verified (export it again)") from None
    except (OSError, ManifestError) as err:
        raise ExportIntegrityError(f"{manifest}: unreadable ({err})") from None
    mismatch = first_mismatch(source.path, listed, hashes=full, unlisted=False, unverified=UNVERIFIED)
    if mismatch is not None:
        raise ExportIntegrityError(_describe(source.path.resolve(), mismatch))
    what = "sizes and sha256" if full else "sizes (--verify also checks sha256)"
    checked = sum(rel not in UNVERIFIED for rel in listed)
    return f"{source.path}: {checked} files match {MANIFEST}: {what}"


def _describe(root: Path, mismatch: Mismatch) -> str:
    """An export file's mismatch, in the words of a load refusal."""
    path = (root / mismatch.rel).resolve()
    return {"outside": f"{root / MANIFEST}: lists {mismatch.rel!r} outside the export",
            "missing": f"{path}: missing (listed in {MANIFEST})",
            "size": f"{path}: {mismatch.size} bytes, {MANIFEST} says {mismatch.listed}: truncated or replaced; "
                    "refusing to load it",
            "sha256": f"{path}: sha256 differs from {MANIFEST}: altered; refusing to load it"}[mismatch.problem]


def merged_model_config(source: ModelSource) -> ModelConfig:
    """The config that rebuilds a merged export: its own LLaMA dir and OpenFlamingo checkpoint,
    the source's vision weights and seed, no LoRA (it is folded into the weights)."""
    assert source.merged_dir is not None
    base = source.model_config
    lm = source.merged_dir / LANGUAGE_MODEL_DIR
    return replace(base, llama_path=str(lm), tokenizer_path=str(lm), lora="none", lora_checkpoint=None,
                   openflamingo_checkpoint=str(source.merged_dir / OPENFLAMINGO_DIR / OPENFLAMINGO_FILE))


def load_model(source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               ) -> BuiltModel:
    """Build the model a source describes, in eval mode, with the source's settings (its
    media attention, its preset's image size)."""
    if source.merged_dir is not None:
        built = build_model(merged_model_config(source), device=device, dtype=dtype)
    else:
        built = build_model(replace(source.model_config, lora="none", lora_checkpoint=None), device=device,
                            dtype=dtype)
        built.model.lang_encoder = PeftModel.from_pretrained(built.model.lang_encoder, str(source.adapter_dir))
        built.model.to(device=device, dtype=dtype)
    built.model.eval()
    return built
