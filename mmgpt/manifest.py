"""The one writer and checker of manifest.json: size + sha256 of every file of a training
checkpoint (`train/checkpointing.py`) or an export (`export.py`, checked by `inference/model_dir.py`).
Eval reads an export's hashes from it too.

Both kinds share how files are listed, hashed, written and compared, so they always agree on what
"the same bytes" means. Each keeps the size field it has always written (a checkpoint's `size`, an
export's `bytes`) and its own top-level fields, so old checkpoints and exports still verify; each
caller words a mismatch for its own users (`Mismatch`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from mmgpt.run_layout import MANIFEST

_BLOCK = 1 << 20  # read in 1 MiB blocks: weight files can be larger than memory
CHECKPOINT_SIZE = "size"
EXPORT_SIZE = "bytes"


class FileDigest(NamedTuple):
    size: int
    sha256: str


class ManifestError(ValueError):
    """A manifest.json that cannot be read as one (the message says why)."""


class Mismatch(NamedTuple):
    """The first file that differs from its manifest. `problem`: missing | size | sha256 | unlisted
    (present, not listed) | outside (listed outside the directory). `size`/`listed`: bytes found
    and bytes listed, for `size`."""

    rel: str
    problem: str
    size: int = 0
    listed: int = 0


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


def write_manifest(root: Path, fields: dict[str, Any], size_key: str = CHECKPOINT_SIZE) -> None:
    """Write root/manifest.json: `fields`, then `files`: every other file under `root` with its
    size (under `size_key`) and sha256. Atomic (temp file + fsync + rename), so a kill leaves no
    half-written manifest."""
    files = {rel: {size_key: d.size, "sha256": d.sha256} for rel, d in file_digests(root, skip=(MANIFEST,)).items()}
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**fields, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(root: Path) -> dict[str, FileDigest]:
    """The files root/manifest.json lists (either size field). FileNotFoundError when there is
    none; ManifestError when it is unreadable."""
    try:
        files = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["files"]
        return {str(rel): FileDigest(int(f[CHECKPOINT_SIZE] if CHECKPOINT_SIZE in f else f[EXPORT_SIZE]),
                                     str(f["sha256"])) for rel, f in files.items()}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ManifestError(f"{type(err).__name__}: {err}") from None


def first_mismatch(root: Path, listed: dict[str, FileDigest], *, hashes: bool = True, unlisted: bool = True,
                   unverified: tuple[str, ...] = ()) -> Mismatch | None:
    """The first file under `root` (sorted) that differs from `listed`, or None when all match.

    Sizes are always compared (a stat each: catches truncation); with `hashes` the sha256 too
    (reads every byte: catches altered bytes); with `unlisted`, a file the manifest does not list
    is a mismatch. Entries named in `unverified` are not checked."""
    base = root.resolve()
    for rel, want in sorted(listed.items()):
        if rel in unverified:
            continue
        path = (base / rel).resolve()
        if not path.is_relative_to(base):
            return Mismatch(rel, "outside")
        if not path.is_file():
            return Mismatch(rel, "missing")
        size = path.stat().st_size
        if size != want.size:
            return Mismatch(rel, "size", size, want.size)
        if hashes and sha256(path) != want.sha256:
            return Mismatch(rel, "sha256")
    if unlisted:
        extra = [rel for rel in listed_files(root, skip=(MANIFEST,)) if rel not in listed]
        if extra:
            return Mismatch(extra[0], "unlisted")
    return None
