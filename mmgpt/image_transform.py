"""The CLIP preprocessing OpenFlamingo was trained with: one image in, the model's input tensor out.

A neutral module because both sides need the same function: the data side transforms training
images with it (`mmgpt.data` may not import the models), and a built model carries its own
(`mmgpt.models.builder.BuiltModel.transform`) for chat, evaluation and export probes.
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms

# OpenAI CLIP normalisation (open_clip OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Transform = Callable[[Image.Image], torch.Tensor]


def clip_transform(image_size: int) -> Transform:
    """Bicubic resize of the short side, center crop, to tensor, CLIP mean/std."""
    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
