"""LoRA presets (peft) for the language side of MultiModal-GPT.

`default` is the released MultiModal-GPT config: LLaMA self-attention q/k/v/o and, inside the gated
cross-attention blocks only, to_q/to_kv/to_out/ff.1/ff.3. `paper` adds the LLaMA MLP, as the paper's
Figure 1 draws it. target_modules is a regex (peft full-matches it against module names under
`lang_encoder`) so that nothing outside these blocks with the same leaf name is ever adapted.
"""
from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

LORA_RANK = 16
LORA_ALPHA = 16

_SELF_ATTN = r"decoder_layer\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_CROSS_ATTN = r"gated_cross_attn_layer\.(attn\.(to_q|to_kv|to_out)|ff\.(1|3))"
_LLAMA_MLP = r"decoder_layer\.mlp\.(gate_proj|up_proj|down_proj)"

LORA_TARGETS: dict[str, list[str]] = {
    "default": [_SELF_ATTN, _CROSS_ATTN],
    "paper": [_SELF_ATTN, _CROSS_ATTN, _LLAMA_MLP],
}


def lora_config(preset: str) -> LoraConfig:
    """peft config for a preset name ('default' or 'paper')."""
    if preset not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA preset {preset!r}; choose from {sorted(LORA_TARGETS)}")
    pattern = r"model\.layers\.\d+\.(" + "|".join(LORA_TARGETS[preset]) + r")"
    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=pattern)


def apply_lora(lang_encoder: nn.Module, preset: str) -> nn.Module:
    """Wrap the language model with peft; afterwards only the LoRA matrices require grad."""
    return get_peft_model(lang_encoder, lora_config(preset))
