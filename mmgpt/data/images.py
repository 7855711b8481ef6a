"""Safe image loading for training data (the CLIP preprocessing itself: mmgpt/image_transform.py).

Dataset files name images by relative path; a record is untrusted input, so the path is resolved
and checked to lie inside the source's image root BEFORE anything is opened. An image file is
untrusted too: its header size is checked against a pixel cap before any pixel is decoded (a
20 KB PNG can hold 169 megapixels), and so is its aspect ratio: the short-side resize of a 1x10000
strip would make a 224x2240000 image (GBs) for a 224x224 crop. Problems come back as a reason
string (counted in the data report), never as an exception mid-training.

Conversion to RGB (`to_rgb`): PIL's own `convert("RGB")` clips 16-bit and float samples to 0..255
(a 16-bit gradient becomes white), so those are scaled from their range first; transparent
pixels are composited onto white (the stored colour under alpha 0 is arbitrary, often black).
EXIF orientation is NOT applied: the original MultiModal-GPT (and OpenFlamingo's pretraining)
loaded `Image.open(path).convert("RGB")`, which keeps the stored orientation, so the released
weights saw images that way; applying it here would change what a fine-tune sees.
"""
from __future__ import annotations

import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image

from mmgpt.image_transform import Transform

BAD_IMAGE_PATH = "bad_image_path"
PATH_ESCAPES_ROOT = "path_escapes_root"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
IMAGE_VALUES_OUT_OF_RANGE = "image_values_out_of_range"

# Decoded images above this many pixels are refused (64 MP is ~190 MB as RGB; CLIP sees 224x224).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# Long side / short side above this is refused from the header: the resize's output is at most this
# many crops wide, so its cost stays below the decoding's. 20:1 passes stitched phone panoramas.
MAX_ASPECT_RATIO = 20
# White, the background transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)


def resolve_inside(root: Path, rel: str) -> Path | str:
    """The file `rel` names under `root`, or a reason when it is empty, escapes the root or cannot
    be resolved (a lone surrogate, a symlink loop, a name too long).

    Absolute paths, `..` components and symlinks leading outside are all rejected: the check is
    done on the fully resolved path, without opening anything.
    """
    if not isinstance(rel, str) or not rel.strip():
        return BAD_IMAGE_PATH
    if Path(rel).is_absolute() or "\x00" in rel:
        return PATH_ESCAPES_ROOT
    base = Path(root).resolve()
    try:
        path = (base / rel).resolve()
    except (OSError, ValueError, RuntimeError):  # name too long, lone surrogate, symlink loop (3.11)
        return BAD_IMAGE_PATH
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
    try:  # not Path.is_file(): it raises for some errors and hides others (ELOOP) as "missing"
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return MISSING_IMAGE
    except PermissionError:
        return UNREADABLE_IMAGE
    except (OSError, ValueError):  # a symlink loop (ELOOP), a component over 255 bytes (ENAMETOOLONG)
        return BAD_IMAGE_PATH
    return path if stat.S_ISREG(mode) else MISSING_IMAGE


def open_rgb(file: str | Path | BinaryIO,
             max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image | str:
    """The image in `file` as RGB, or the reason it is refused; never raises for a bad file.

    The size is read from the header (PIL opens lazily) and checked against `max_pixels` (None: no
    cap of ours) and `MAX_ASPECT_RATIO` before decoding; PIL's own bomb warning is silenced since
    this cap decides, and its bomb error (past twice `Image.MAX_IMAGE_PIXELS`) is the same refusal.
    For chat and serve as well as training: they turn the reason into their own error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    return IMAGE_TOO_LARGE
                if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                    return EXTREME_ASPECT_RATIO
                return to_rgb(img)
    except Image.DecompressionBombError:
        return IMAGE_TOO_LARGE
    except PermissionError:
        return UNREADABLE_IMAGE
    except Exception:  # noqa: BLE001 - PIL plugins raise SyntaxError, struct.error, EOFError, ...
        return CORRUPT_IMAGE


def to_rgb(img: Image.Image) -> Image.Image | str:
    """`img` as 8-bit RGB with its samples' full range kept, or a reason (values out of range).

    16-bit integer samples (modes I;16*, and I, PIL's widening of them) are scaled by 255/65535;
    float samples (F) are taken as 0..1, the float-image convention. Outside those ranges the
    intended scale is unknown: refused rather than guessed. Alpha, a palette's transparent index
    and a tRNS colour key are composited onto white.
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        low, high = img.getextrema()
        top = 1.0 if mode == "F" else 65535
        if low < 0 or high > top:
            return IMAGE_VALUES_OUT_OF_RANGE
        wide = img if mode == "F" else img.convert("I")
        # PIL's I/F -> L conversion truncates: + 0.5 rounds to nearest.
        img = wide.point(lambda v: v * (255 / top) + 0.5).convert("L")
    if "transparency" in img.info or any(band in ("A", "a") for band in img.getbands()):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", img.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def load_image(root: Path, rel: str, transform: Transform,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor | str:
    """Open, convert to RGB and transform one image; a str return is the skip reason."""
    path = find_image(root, rel)
    if isinstance(path, str):
        return path
    rgb = open_rgb(path, max_pixels)
    return rgb if isinstance(rgb, str) else transform(rgb)
