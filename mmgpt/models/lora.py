"""LoRA for the language side of MultiModal-GPT: named presets and user settings, applied with peft.

`model.lora` is a preset name (`default`, `paper`, `none`) or a `LoraSpec` mapping `{preset, r, alpha,
dropout, targets}` whose unset fields come from the preset. `default` is the released MultiModal-GPT
config (configs/lora_config.py: r 16, alpha 16, dropout 0, LLaMA self-attention q/k/v/o and, inside
the gated cross-attention blocks only, to_q/to_kv/to_out/ff.1/ff.3); `paper` adds the LLaMA MLP, as
the paper's Figure 1 draws it. Targets use the original's `lora_target_modules` names; each is
placed by `TARGET_PATTERNS` (peft full-matches one regex against module names under `lang_encoder`)
so that nothing outside these blocks with the same leaf name is ever adapted.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from peft import LoraConfig, get_peft_model
from torch import nn

TARGET_PATTERNS: dict[str, str] = {
    **{name: rf"decoder_layer\.self_attn\.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{name: rf"decoder_layer\.mlp\.{name}" for name in ("gate_proj", "up_proj", "down_proj")},
    **{name: rf"gated_cross_attn_layer\.attn\.{name}" for name in ("to_q", "to_kv", "to_out")},
    **{name: rf"gated_cross_attn_layer\.ff\.{name[-1]}" for name in ("ff.1", "ff.3")},
}
_RELEASED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out", "ff.1", "ff.3")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings; a field left None takes the preset's value (`resolved()`)."""

    preset: str = "default"
    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    targets: tuple[str, ...] | None = None  # names from TARGET_PATTERNS

    def resolved(self) -> LoraSpec:
        """Every field set, checked: the preset's values where this spec leaves them None."""
        if self.preset not in LORA_PRESETS:
            raise ValueError(f"unknown LoRA preset {self.preset!r}; choose from {sorted(LORA_PRESETS)} or 'none'")
        base = LORA_PRESETS[self.preset]
        spec = replace(base, **{k: v for k, v in vars(self).items() if v is not None and k != "preset"})
        unknown = [t for t in spec.targets if t not in TARGET_PATTERNS]
        if unknown or not spec.targets:
            raise ValueError(f"LoRA targets {list(unknown) or '[]'} unknown; choose from {list(TARGET_PATTERNS)}")
        if spec.r < 1 or not 0.0 <= spec.dropout < 1.0:
            raise ValueError(f"LoRA r must be >= 1 and dropout in [0, 1), got r={spec.r}, dropout={spec.dropout}")
        return replace(spec, targets=tuple(spec.targets), dropout=float(spec.dropout))


LORA_PRESETS: dict[str, LoraSpec] = {
    "default": LoraSpec("default", r=16, alpha=16, dropout=0.0, targets=_RELEASED_TARGETS),
    "paper": LoraSpec("paper", r=16, alpha=16, dropout=0.0,
                      targets=_RELEASED_TARGETS + ("gate_proj", "up_proj", "down_proj")),
}


def lora_spec(value: str | LoraSpec) -> LoraSpec | None:
    """`model.lora` as resolved settings; None for 'none' (no LoRA)."""
    if value == "none":
        return None
    return (LoraSpec(preset=value) if isinstance(value, str) else value).resolved()


def lora_config(spec: LoraSpec) -> LoraConfig:
    """peft config for resolved settings."""
    pattern = r"model\.layers\.\d+\.(" + "|".join(TARGET_PATTERNS[t] for t in spec.targets) + r")"
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      target_modules=pattern)


def apply_lora(lang_encoder: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap the language model with peft; afterwards only the LoRA matrices require grad."""
    return get_peft_model(lang_encoder, lora_config(spec))
