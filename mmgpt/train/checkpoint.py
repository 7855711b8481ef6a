"""Checkpoint directory layout, the atomic `latest` pointer, keep-last-K, and verified resume.

    OUT/checkpoints/step_00000100/   DeepSpeed files (LoRA weights + optimizer + scheduler, no
                                     frozen weights) and adapter/ (peft format)
    OUT/checkpoints/latest           the tag of the newest COMPLETE checkpoint

Why our own pointer: DeepSpeed writes its `latest` file while other ranks may still be writing,
and a kill at that moment leaves it naming a half-written tag. Here every rank finishes its part,
all ranks pass a barrier, and only then rank 0 replaces `latest` atomically (temp file + fsync +
os.replace). A kill at any point leaves `latest` on the previous complete checkpoint.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from mmgpt.run_layout import LATEST, CheckpointError, is_tag, read_latest, step_of, tag_for



class SavingEngine(Protocol):
    """The part of deepspeed.DeepSpeedEngine used here (a fake in unit tests)."""

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
        _fsync_dir(self.root)
        older = [t for t in self.tags() if step_of(t) <= step]
        doomed = older[:-self.keep_last] + [t for t in self.tags() if step_of(t) > step]
        for old in doomed:
            shutil.rmtree(self.root / old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(manager: CheckpointManager, engine: SavingEngine, step: int, client_state: dict[str, Any], *,
         is_rank0: bool, barrier: Callable[[], None], adapter: nn.Module | None = None) -> str:
    """Collective save of step `step`; returns the tag. `latest` moves only after every rank is done."""
    tag = tag_for(step)
    if is_rank0:
        manager.prepare(tag)
    barrier()
    engine.save_checkpoint(str(manager.root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    if is_rank0 and adapter is not None:
        adapter.save_pretrained(str(manager.root / tag / "adapter"))
    barrier()
    if is_rank0:
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
