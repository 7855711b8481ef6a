"""`mmgpt params`: parameter counts of a preset without weights.

The model is built on the meta device (no memory, no files), so the 9B architecture can be
counted anywhere. (FLOPs for MFU: mmgpt/perf.py.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mmgpt.configfile import ConfigError, from_dict
from mmgpt.models.builder import ModelConfig, build_model
from mmgpt.models.lora import LoraSpec, lora_spec


def parse_lora_option(text: str) -> str | LoraSpec:
    """`--lora`: a preset name, or an inline YAML mapping such as `{preset: paper, r: 8}`."""
    if not text.lstrip().startswith("{"):
        return text
    import yaml

    try:
        return from_dict(LoraSpec, yaml.safe_load(text), "--lora")
    except yaml.YAMLError as err:
        raise ConfigError(f"--lora: not a YAML mapping: {' '.join(str(err).split())}") from None


def count_params(model: nn.Module) -> dict[str, int]:
    """Total / trainable counts and a breakdown by component."""
    parts = {"vision_encoder": 0, "perceiver": 0, "cross_attention": 0, "language_model": 0, "lora": 0}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            parts["lora"] += p.numel()
        elif ".gated_cross_attn_layer." in name:
            parts["cross_attention"] += p.numel()
        elif name.startswith(("vision_encoder.", "perceiver.")):
            parts[name.split(".")[0]] += p.numel()
        else:
            parts["language_model"] += p.numel()
    return {"total_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **{f"{k}_params": v for k, v in parts.items()}}


@dataclass(frozen=True)
class ParamsOptions:
    """What `mmgpt params` counts (flags and defaults: mmgpt/cli/params.py)."""

    preset: str
    lora: str  # default | paper | none, or a YAML mapping (parse_lora_option)
    json: Path | None  # also write the counts here


def run(args: ParamsOptions) -> int:
    """`mmgpt params`: print the counts (and write them as JSON)."""
    lora = parse_lora_option(args.lora)
    model = build_model(ModelConfig(preset=args.preset, lora=lora), meta=True).model
    resolved = lora_spec(lora)
    counts = {"preset": args.preset, "lora": "none" if resolved is None else
              f"{resolved.preset} r={resolved.r} alpha={resolved.alpha} targets={','.join(resolved.targets)}",
              **count_params(model)}
    for key, value in counts.items():
        print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(counts, indent=2) + "\n")
    return 0
