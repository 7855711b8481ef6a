"""Test-only knobs on a built model: open the tanh gates, give LoRA non-zero B matrices, full logits.

peft starts every lora_B at zero and OpenFlamingo every gate at zero, so a fresh model hides both
cross-attention and LoRA; tests open them to make the checks sensitive.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmgpt.contracts import PackedBatch


def open_gates(model, value: float) -> None:
    """Set every attn/ff gate of the cross-attention blocks (0 restores identity)."""
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.attn_gate.fill_(value)
                layer.gated_cross_attn_layer.ff_gate.fill_(value)


def randomize_lora_b(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give every lora_B a seeded non-zero value, so LoRA changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def packed_logits(model, batch: PackedBatch) -> Tensor:
    """[T, V] logits of a packed batch (materialises every logit: leak checks only)."""
    return model.lm_head(model(**batch.model_inputs()))
