"""`mmgpt params`: parameter counts of a preset without weights.

The model is built on the meta device (no memory, no files), so the 9B architecture can be
counted anywhere. (FLOPs for MFU: mmgpt/perf.py.)
"""
from __future__ import annotations

import argparse
import json

from torch import nn

from mmgpt.models.builder import ModelConfig, build_model


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


def run(args: argparse.Namespace) -> int:
    """`mmgpt params` (parser: mmgpt/commands/params.py)."""
    model, _ = build_model(ModelConfig(preset=args.preset, lora=args.lora), meta=True)
    counts = {"preset": args.preset, "lora": args.lora, **count_params(model)}
    for key, value in counts.items():
        print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(counts, indent=2) + "\n")
    return 0
