"""The one file hasher behind both manifest.json files: a training checkpoint's
(`train/checkpointing.py`) and an export's (`export.py`, checked by `inference/model_dir.py`).

Each keeps its own manifest fields (old checkpoints and exports must still verify); what they share
is how files are listed and hashed, so both always agree on what "the same bytes" means.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

MANIFEST = "manifest.json"
_BLOCK = 1 << 20  # read in 1 MiB blocks: weight files can be larger than memory


class FileDigest(NamedTuple):
    size: int
    sha256: str


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def listed_files(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under `root` whose name is not in `skip`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name not in skip)


def file_digests(root: Path, skip: tuple[str, ...] = ()) -> dict[str, FileDigest]:
    """Size and sha256 of every file under `root` (as `listed_files`), keyed by relative POSIX path."""
    return {rel: FileDigest((root / rel).stat().st_size, sha256(root / rel)) for rel in listed_files(root, skip)}
