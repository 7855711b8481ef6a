"""Checkpoint files: safe reading and strict, reported loading of OpenFlamingo / MultiModal-GPT weights.

Released files name weights in their own layouts; both sides are reduced to one canonical name:
  - wrappers: `{"model_state_dict": ...}`, `{"state_dict": ...}`, `{"module": ...}`, `module.` prefixes;
  - peft: `lang_encoder.base_model.model.X` -> `lang_encoder.X`, `.base_layer` dropped,
    `lora_A.default.weight` -> `lora_A.weight` (the released MultiModal-GPT layout has no `.default`);
  - OpenFlamingo v1 aliases `lang_encoder.gated_cross_attn_layers.{i}.*` (and v2's
    `lang_encoder.old_decoder_blocks.{i}.*`) point at `lang_encoder.model.layers.{i}.*`;
  - OpenFlamingo stores the ViT as `vision_encoder.*`, we as `vision_encoder.visual.*`.
Loading fails listing every missing required weight (perceiver, cross-attention, LoRA), every unknown
key and every shape mismatch; known-harmless extras (aliases, rotary/position buffers) are reported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

WRAPPER_KEYS = ("model_state_dict", "state_dict", "module", "model")
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached", "position_ids")
_ALIASES = [
    (re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\."), r"lang_encoder.model.layers.\1.gated_cross_attn_layer."),
    (re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\."), r"lang_encoder.model.layers.\1.decoder_layer."),
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending key."""


@dataclass
class LoadReport:
    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)  # our parameter/buffer names that were set
    harmless: list[str] = field(default_factory=list)  # checkpoint keys skipped on purpose

    def __str__(self) -> str:
        extra = f"; ignored {len(self.harmless)} harmless extras (e.g. {self.harmless[:3]})" if self.harmless else ""
        return f"loaded {len(self.loaded)} tensors from {self.kind} checkpoint {self.path}{extra}"


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a torch file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def unwrap(state: dict) -> dict[str, Tensor]:
    """Strip `{"model_state_dict": ...}`-style wrappers and `module.` prefixes."""
    while len(state) == 1 or any(k in state for k in WRAPPER_KEYS):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if isinstance(value, Tensor):
            out[key] = value
    return out


def canonical(key: str) -> str:
    """One name for the same weight across OpenFlamingo, MultiModal-GPT, peft and this model."""
    key = key.replace("lang_encoder.base_model.model.", "lang_encoder.", 1)
    key = key.replace(".base_layer.", ".")
    key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)
    return key.replace("vision_encoder.visual.", "vision_encoder.", 1)


def _alias_target(key: str) -> str | None:
    for pattern, repl in _ALIASES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def load_into(model: nn.Module, state: dict, source: str, kind: str,
              required: Callable[[str], bool]) -> LoadReport:
    """Copy every checkpoint tensor onto the matching model tensor; fail on anything unaccounted for.

    `required(canonical_name)` says which model tensors the checkpoint must provide.
    """
    state = unwrap(state)
    ours = model.state_dict()
    by_canonical = {canonical(k): k for k in ours}
    given = {canonical(k) for k in state}
    report = LoadReport(path=source, kind=kind)
    plan: dict[str, Tensor] = {}
    unknown, mismatched = [], []
    for key, value in state.items():
        name = canonical(key)
        target = _alias_target(name)
        if target is not None:
            if target in given:  # the same tensor under its primary name: nothing to do
                report.harmless.append(key)
                continue
            name = target
        if name not in by_canonical:
            (report.harmless if name.endswith(HARMLESS_SUFFIXES) else unknown).append(key)
            continue
        our_key = by_canonical[name]
        if tuple(ours[our_key].shape) != tuple(value.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[our_key].shape)}")
            continue
        plan[our_key] = value
    missing = [k for k in ours if required(canonical(k)) and k not in plan]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} required weights: {missing}")
    if unknown:
        problems.append(f"{len(unknown)} keys match nothing in the model: {unknown}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched}")
    if problems:
        raise CheckpointError(f"{kind} checkpoint {source} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for our_key, value in plan.items():
            ours[our_key].copy_(value)
    report.loaded = sorted(plan)
    return report


def is_openflamingo_weight(name: str) -> bool:
    """Weights an OpenFlamingo checkpoint must provide: the perceiver and the cross-attention blocks."""
    return (name.startswith("perceiver.") or ".gated_cross_attn_layer." in name) and ".lora_" not in name


def is_lora_weight(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def load_openflamingo(model: nn.Module, path: str | Path) -> LoadReport:
    """OpenFlamingo v1 `checkpoint.pt` (or a v2-style flat dict) onto the model (before or after LoRA)."""
    return load_into(model, load_state_file(path), str(path), "OpenFlamingo", is_openflamingo_weight)


def load_lora(model: nn.Module, path: str | Path) -> LoadReport:
    """Released MultiModal-GPT LoRA checkpoint (with or without peft's `.default`) onto a LoRA model."""
    if not any(is_lora_weight(k) for k in model.state_dict()):
        raise CheckpointError(f"{path}: the model has no LoRA layers to load a LoRA checkpoint into")
    return load_into(model, load_state_file(path), str(path), "MultiModal-GPT LoRA", is_lora_weight)
