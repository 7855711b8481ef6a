"""Frozen open_clip ViT returning patch tokens BEFORE `ln_post`.

OpenFlamingo checkpoints were trained on the pre-`ln_post` patch tokens (CLS excluded). open_clip
>= 2.23 applies `ln_post` to the tokens unless the ViT pools with `final_ln_after_pool=True`, so
the encoder is built with that flag and `output_tokens=True`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from open_clip.transformer import QuickGELU, VisionTransformer
from torch import Tensor, nn

from mmgpt.models.pretrained import WeightsError, load_state_file, unwrap


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

    def load_clip_weights(self, path: str | Path) -> None:
        """Load the `visual.*` part of an open_clip CLIP state dict (.pt/.bin/.safetensors).

        The 9b preset's QuickGELU matches OpenAI's ViT-L-14 weights (what OpenFlamingo-9B used).
        """
        state = unwrap(load_state_file(path))
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise WeightsError(f"{path}: no 'visual.*' keys; expected an open_clip CLIP state dict")
        missing, unexpected = self.visual.load_state_dict(visual, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{path}: CLIP vision weights do not match the ViT: "
                                  f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")

