"""Frozen open_clip ViT returning patch tokens BEFORE `ln_post`.

OpenFlamingo checkpoints were trained on the pre-`ln_post` patch tokens (CLS excluded). open_clip
>= 2.23 applies `ln_post` to the tokens unless the ViT pools with `final_ln_after_pool=True`, so
the encoder is built with that flag and `output_tokens=True`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import Tensor, nn

from mmgpt.models.clip_forms import read_clip_weights
from mmgpt.models.pretrained import WeightsError


@dataclass(frozen=True)
class VisionSpec:
    """Architecture of an open_clip ViT (ViT-L-14 for the 9B model)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    head_width: int = 64
    output_dim: int = 768
    quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


VIT_L_14 = VisionSpec(image_size=224, patch_size=14, width=1024, layers=24, output_dim=768)


class VisionEncoder(nn.Module):
    """open_clip `visual` tower; forward gives [M, num_patches, width] pre-ln_post tokens."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.visual = VisionTransformer(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            width=spec.width,
            layers=spec.layers,
            heads=spec.width // spec.head_width,
            mlp_ratio=4.0,
            output_dim=spec.output_dim,
            final_ln_after_pool=True,
            output_tokens=True,
            act_layer=QuickGELU if spec.quick_gelu else nn.GELU,
        )

    @property
    def width(self) -> int:
        return self.spec.width

    def forward(self, images: Tensor) -> Tensor:
        _, tokens = self.visual(images)
        return tokens

    def load_clip_weights(self, path: str | Path) -> str:
        """Load the vision tower of a CLIP checkpoint in any form `clip_forms` reads; says which form.

        The 9b preset's QuickGELU matches OpenAI's ViT-L-14 weights (what OpenFlamingo-9B used).
        """
        weights = read_clip_weights(path)
        ours = self.visual.state_dict()
        missing = sorted(set(ours) - set(weights.visual) - set(weights.absent))
        unexpected = sorted(set(weights.visual) - set(ours))
        mismatched = [f"{k}: file {tuple(weights.visual[k].shape)} vs model {tuple(ours[k].shape)}"
                      for k in sorted(set(ours) & set(weights.visual)) if weights.visual[k].shape != ours[k].shape]
        if missing or unexpected or mismatched:
            raise WeightsError(f"{path}: CLIP vision weights ({weights.form} form) do not match the ViT: "
                               f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}")
        with torch.no_grad():
            for name, value in weights.visual.items():
                ours[name].copy_(value)
        return weights.describe()
