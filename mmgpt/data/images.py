"""Safe image loading for training data, and the CLIP preprocessing OpenFlamingo was trained with.

Dataset files name images by relative path; a record is untrusted input, so the path is resolved
and checked to lie inside the source's image root BEFORE anything is opened. Problems come back
as a reason string (counted in the data report), never as an exception mid-training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

# OpenAI CLIP normalisation (open_clip OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BAD_IMAGE_PATH = "bad_image_path"
PATH_ESCAPES_ROOT = "path_escapes_root"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
CORRUPT_IMAGE = "corrupt_image"

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


def resolve_inside(root: Path, rel: str) -> Path | str:
    """The file `rel` names under `root`, or a reason when it is empty or escapes the root.

    Absolute paths, `..` components and symlinks leading outside are all rejected: the check is
    done on the fully resolved path, without opening anything.
    """
    if not isinstance(rel, str) or not rel.strip():
        return BAD_IMAGE_PATH
    if Path(rel).is_absolute() or "\x00" in rel:
        return PATH_ESCAPES_ROOT
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        return PATH_ESCAPES_ROOT
    return path


def find_image(root: Path, rel: str) -> Path | str:
    """The existing file `rel` names under `root`, or the reason it is unusable.

    Only resolves and stats (never opens), so the mixture can screen every record up front.
    """
    path = resolve_inside(root, rel)
    if isinstance(path, str):
        return path
    return path if path.is_file() else MISSING_IMAGE


def load_image(root: Path, rel: str, transform: Transform) -> torch.Tensor | str:
    """Open, convert to RGB and transform one image; a str return is the skip reason."""
    path = find_image(root, rel)
    if isinstance(path, str):
        return path
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except PermissionError:
        return UNREADABLE_IMAGE
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return CORRUPT_IMAGE
    return transform(rgb)
