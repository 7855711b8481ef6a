"""Training checkpoints: directory layout, the atomic `latest` pointer, keep-last-K, the manifest,
verified restore, and the per-rank data-order log that a resume truncates.

    OUT/checkpoints/step_00000100/   DeepSpeed files (LoRA weights + optimizer + scheduler, no
                                     frozen weights), adapter/ (peft format), trained_with.json
                                     (what it was trained with: run_record.py) and manifest.json
                                     (size + sha256 of every other file)
    OUT/checkpoints/latest           the tag of the newest COMPLETE checkpoint

Why our own pointer: DeepSpeed writes its `latest` file while other ranks may still be writing,
and a kill at that moment leaves it naming a half-written tag. Here every rank finishes its part,
all ranks pass a barrier, and only then rank 0 replaces `latest` atomically (temp file + fsync +
os.replace). A kill at any point leaves `latest` on the previous complete checkpoint.

Why a manifest: a resumed run must start from exactly the bytes that were written. Rank 0 writes
manifest.json after every rank has saved and before `latest` moves; resume (`verify`) refuses a
missing, truncated, altered or unlisted file, naming it and the previous checkpoint to fall back to.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from mmgpt import manifest
from mmgpt.manifest import ManifestError, Mismatch, first_mismatch, fsync_dir, read_manifest
from mmgpt.run_layout import (ADAPTER_DIR, CHECKPOINTS_DIR, LATEST, MANIFEST, CheckpointError, is_tag, read_latest,
                              step_of, tag_for)
from mmgpt.train import run_record
from mmgpt.train.engine import WeightsOnlyCheckpointEngine, all_gather

MIN_FREE_BYTES = 64 * 2**20  # below this after a failed write, the disk was the cause

log = logging.getLogger("mmgpt.train")


class SavingEngine(Protocol):
    """The part of deepspeed.DeepSpeedEngine used here (any object with this method will do)."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool,
                        exclude_frozen_parameters: bool) -> Any: ...


class CheckpointManager:
    """Owns OUT/checkpoints: which tags exist, which one is `latest`, and pruning to `keep_last`."""

    def __init__(self, root: str | Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def tags(self) -> list[str]:
        """Checkpoint directories present, oldest first (complete or not)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_tag(p.name))

    def latest(self) -> str | None:
        """The tag `latest` points to, or None when there is no committed checkpoint."""
        return read_latest(self.root)

    def fallback(self, tag: str) -> str:
        """How to resume from the checkpoint before `tag` instead (for error messages)."""
        older = [t for t in self.tags() if step_of(t) < step_of(tag)]
        if not older:
            return "no earlier checkpoint to fall back to"
        return (f"previous checkpoint: {older[-1]} (to resume from it, write {older[-1]} into "
                f"{self.root / LATEST})")

    def prepare(self, tag: str) -> Path:
        """Empty directory for a new save (a leftover from a killed save of the same step goes)."""
        if tag == self.latest():
            raise CheckpointError(f"refusing to overwrite {self.root / tag}: `latest` points to it")
        path = self.root / tag
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, tag: str) -> None:
        """Point `latest` at `tag` atomically, then delete tags beyond the newest `keep_last`.

        Tags newer than `tag` are leftovers of an abandoned timeline (a run killed after saving
        them, resumed from an older checkpoint) and are deleted too.
        """
        step = step_of(tag)
        tmp = self.root / f".{LATEST}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(tag + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        fsync_dir(self.root)
        older = [t for t in self.tags() if step_of(t) <= step]
        doomed = older[:-self.keep_last] + [t for t in self.tags() if step_of(t) > step]
        for old in doomed:
            shutil.rmtree(self.root / old, ignore_errors=True)


def write_manifest(step_dir: Path) -> None:
    """Record size + sha256 of every file of a complete checkpoint (mmgpt/manifest.py)."""
    manifest.write_manifest(step_dir, {"format": 1})


def describe(mismatch: Mismatch) -> str:
    """A checkpoint file's mismatch, in the words of a resume refusal."""
    rel = mismatch.rel
    if mismatch.problem == "size" and mismatch.size < mismatch.listed:
        return f"{rel} is truncated ({mismatch.size} of {mismatch.listed} bytes)"
    return {"missing": f"{rel} is missing",
            "size": f"{rel} has {mismatch.size} bytes, {mismatch.listed} were written",
            "sha256": f"{rel} was altered (sha256 differs from {MANIFEST})",
            "unlisted": f"{rel} is not in {MANIFEST} (added after the checkpoint was written)",
            "outside": f"{MANIFEST} lists {rel!r} outside the checkpoint"}[mismatch.problem]


def _manifest_problem(step_dir: Path) -> str | None:
    """The first file that differs from the manifest, with what is wrong; None when all match."""
    try:
        mismatch = first_mismatch(step_dir, read_manifest(step_dir))
    except (OSError, ManifestError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    return None if mismatch is None else describe(mismatch)


def refusal(err: pickle.UnpicklingError) -> str:
    """One line for torch's multi-line weights-only refusal, e.g. 'Unsupported global: GLOBAL io.open'."""
    match = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed global| Please|\n|$)", str(err))
    return match[1] if match else str(err).splitlines()[0]


def verified_before(manager: CheckpointManager, tag: str) -> str:
    """The newest checkpoint older than `tag` whose files match its manifest, as advice for a refusal."""
    for older in reversed([t for t in manager.tags() if step_of(t) < step_of(tag)]):
        if (manager.root / older / MANIFEST).is_file() and _manifest_problem(manager.root / older) is None:
            return f"{older} is verified (to resume from it, write {older} into {manager.root / LATEST})"
    return "no earlier checkpoint is verified"


def require_manifest(manager: CheckpointManager, tag: str, allow_unverified: bool) -> None:
    """Refuse `tag` when it has no manifest, unless `allow_unverified` (then warn). A file check
    only: cheap enough to run before any model is built (the hashes are checked by `verify`)."""
    if (manager.root / tag / MANIFEST).is_file():
        return
    if not allow_unverified:
        raise CheckpointError(f"checkpoint {tag} has no {MANIFEST}, so its bytes cannot be verified; refusing to "
                              f"resume; {verified_before(manager, tag)}; to resume from {tag} anyway, pass "
                              "--resume-unverified")
    log.warning("checkpoint %s has no %s: resuming from it unverified (--resume-unverified); its files are "
                "loaded weights-only but altered bytes would go unnoticed", tag, MANIFEST)


def verify(manager: CheckpointManager, tag: str, load: Callable[[str], object], allow_unverified: bool = False) -> None:
    """Refuse checkpoint `tag` unless its files match the manifest and every .pt loads with `load`.

    `load` is the engine's weights-only loader. Loading every file here, on one rank, before
    DeepSpeed's load (where each rank reads only its own optimizer shard, then joins collectives)
    turns a bad file in any rank's shard into one error on all ranks instead of a hang.

    No manifest (written before manifests existed, or deleted): refused unless `allow_unverified`,
    because altered tensor bytes would be trained on unnoticed; the message names the newest
    earlier checkpoint that verifies. Allowed, its files are still loaded weights-only (nothing in
    them can run) and a truncated file still fails to load.
    """
    step_dir = manager.root / tag
    if (step_dir / MANIFEST).is_file():
        problem = _manifest_problem(step_dir)
        if problem is not None:
            raise CheckpointError(f"checkpoint {tag}: {problem}; refusing to resume; {manager.fallback(tag)}")
    else:
        require_manifest(manager, tag, allow_unverified)
    for path in sorted(step_dir.glob("*.pt")):
        try:
            load(str(path))
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"checkpoint {tag}: {path.name} refused by the weights-only loader ({refusal(err)}; nothing "
                f"in it was run); refusing to resume; {manager.fallback(tag)}") from err
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"checkpoint {tag}: {path.name} cannot be read ({str(err).splitlines()[0]}); "
                                  f"refusing to resume; {manager.fallback(tag)}") from err


def save_failure(manager: CheckpointManager, tag: str, err: BaseException) -> CheckpointError:
    """One line for a failed save: where, why (no space / permission, else the error) and what
    `latest` still names; logged to train.log as well, since the run stops here."""
    path = manager.root / tag
    errno_ = getattr(err, "errno", None)
    if errno_ == errno.ENOSPC or shutil.disk_usage(manager.root).free < MIN_FREE_BYTES:
        cause = f"no space left on the device ({shutil.disk_usage(manager.root).free // 2**20} MiB free)"
    elif errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = f"permission denied ({os.strerror(errno_)})"
    else:
        cause = f"{type(err).__name__}: {' '.join(str(err).split())}"
    latest = manager.latest()
    still = f"{CHECKPOINTS_DIR}/{LATEST} still names {latest}" if latest else "no checkpoint has been committed yet"
    message = f"saving checkpoint {path} failed: {cause}; {still}"
    log.error("%s", message)
    return CheckpointError(message)


def save(manager: CheckpointManager, engine: SavingEngine, step: int, client_state: dict[str, Any], *,
         is_rank0: bool, barrier: Callable[[], None], adapter: nn.Module | None = None,
         record: dict[str, Any] | None = None) -> str:
    """Collective save of step `step`; returns the tag. `latest` moves only after every rank is done
    and rank 0 has recorded the manifest (the files are on one filesystem shared by all ranks).
    `record`: what the run was trained with (run_record.py), written beside the weights."""
    tag = tag_for(step)
    if is_rank0:
        manager.prepare(tag)
    barrier()
    try:
        engine.save_checkpoint(str(manager.root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        if is_rank0 and adapter is not None:
            adapter.save_pretrained(str(manager.root / tag / ADAPTER_DIR))
        if is_rank0 and record is not None:
            run_record.write(manager.root / tag, record)
    except (OSError, RuntimeError) as err:  # a full disk, a permission, torch's "unexpected pos"
        raise save_failure(manager, tag, err) from err
    barrier()
    if is_rank0:
        write_manifest(manager.root / tag)
        manager.commit(tag)
    barrier()
    return tag


def poison_trainable(model: nn.Module) -> list[str]:
    """Fill every trainable parameter with NaN before a load; returns their names.

    DeepSpeed must load module weights non-strictly (frozen weights are not in the checkpoint) and
    then says nothing about trainable weights it did not find. After the load, any parameter still
    NaN was not restored: `check_restored` names it.
    """
    names = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.fill_(float("nan"))
                names.append(name)
    return names


def check_restored(model: nn.Module, tag: str) -> None:
    """Fail naming the first trainable parameters a resume did not restore (still NaN)."""
    missing = [name for name, p in model.named_parameters() if p.requires_grad and torch.isnan(p).any()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"checkpoint {tag}: trainable parameter(s) not restored: {shown}")


def restore(engine: Any, model: nn.Module, manager: CheckpointManager, world: int, rank: int,
            allow_unverified: bool = False) -> tuple[int, dict[str, Any] | None, int] | None:
    """Load the latest checkpoint: (step, this rank's data position as stored, i.e. a
    `StreamPosition.to_dict()`, consecutive non-finite), or None when there is none.

    Before anything is loaded, rank 0 checks the files against the manifest and loads each one
    weights-only (`verify`; one read of the shared filesystem; a checkpoint without a manifest
    only with `allow_unverified`), and every rank raises the same CheckpointError if that fails.
    Fails naming any trainable parameter the checkpoint did not restore.
    """
    tag = manager.latest()
    seen = all_gather(tag, world)
    if len(set(seen)) > 1:
        raise CheckpointError(f"ranks see different checkpoints in {manager.root} (latest per rank: "
                                   f"{seen}): output_dir must be one filesystem shared by all nodes")
    if tag is None:
        return None
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        raise CheckpointError(f"refusing to resume from {tag}: the engine would unpickle it unrestricted "
                                   "(build it with mmgpt.train.engine.create_engine)")
    problem = None
    if rank == 0:
        try:
            verify(manager, tag, functools.partial(engine.checkpoint_engine.load, map_location="cpu"),
                        allow_unverified)
        except CheckpointError as err:
            problem = str(err)
    problem = all_gather(problem, world)[0]
    if problem is not None:
        raise CheckpointError(problem)
    poison_trainable(model)
    try:
        path, client = engine.load_checkpoint(str(manager.root), tag=tag, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    except pickle.UnpicklingError as err:  # a file replaced after `verify` read it
        raise CheckpointError(f"checkpoint {tag}: refused by the weights-only loader ({refusal(err)}; "
                                   f"nothing in it was run); refusing to resume; {manager.fallback(tag)}") from err
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {manager.root / tag}")
    check_restored(model, tag)
    if client.get("world") != world:
        raise CheckpointError(
            f"checkpoint {tag} was written by {client.get('world')} ranks; resume with the same "
            f"number of ranks ({world} now) so the data position maps exactly")
    return int(client["step"]), client["data"][rank], int(client.get("consecutive_nonfinite", 0))


def open_order_log(path: Path, step: int):
    """The per-rank log of which samples each step used, for appending from `step` on.

    Lines of later steps (written after the checkpoint a resumed run starts from, so they are
    about to be redone) are dropped first: the log lists every step once, as the run that
    produced the weights saw it. Rewritten atomically, so a kill leaves the old or the new log.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
    return open(path, "a", encoding="utf-8")
