"""Checkpoint manager: atomic `latest`, keep-last-K, a failed save never moves `latest`,
and the resume check that names a trainable parameter the checkpoint did not restore."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmgpt.train.checkpoint import (CheckpointError, CheckpointManager, check_restored, poison_trainable,
                                    save, tag_for)


class FakeEngine:
    """Writes files like DeepSpeed's save_checkpoint; `fail_after` files, then raises (a kill)."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.calls = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        self.calls.append((tag, save_latest, exclude_frozen_parameters))
        for i in range(3):
            if self.fail_after is not None and i == self.fail_after:
                raise KeyboardInterrupt("killed mid-save")
            (torch.save({"step": client_state["step"]}, f"{save_dir}/{tag}/part{i}.pt"))


def do_save(manager, step, engine=None):
    return save(manager, engine or FakeEngine(), step, {"step": step}, is_rank0=True, barrier=lambda: None)


def test_latest_is_committed_atomically_and_old_tags_pruned(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    assert manager.latest() is None
    engine = FakeEngine()
    for step in (10, 20, 30):
        assert do_save(manager, step, engine) == tag_for(step)
        assert manager.latest() == tag_for(step)
    assert manager.tags() == [tag_for(20), tag_for(30)]
    assert engine.calls[0] == (tag_for(10), False, True)  # no DeepSpeed `latest`; frozen weights excluded
    assert not (manager.root / "latest.tmp").exists() and len(list(manager.root.glob(".latest*"))) == 0


def test_kill_during_save_keeps_latest_on_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    do_save(manager, 10)
    with pytest.raises(KeyboardInterrupt):
        do_save(manager, 20, FakeEngine(fail_after=2))
    assert manager.latest() == tag_for(10)  # the half-written step 20 is never pointed to
    assert (manager.root / tag_for(20) / "part1.pt").exists()
    # resumed from step 10, the run saves step 20 again: the broken leftover is replaced
    do_save(manager, 20)
    assert manager.latest() == tag_for(20)
    assert sorted(p.name for p in (manager.root / tag_for(20)).iterdir()) == ["part0.pt", "part1.pt", "part2.pt"]


def test_commit_drops_abandoned_newer_tags(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=5)
    for step in (10, 20, 30):
        do_save(manager, step)
    (manager.root / "latest").write_text(tag_for(10))  # as if the run resumed from 10 (e.g. by hand)
    do_save(manager, 15)
    assert manager.tags() == [tag_for(10), tag_for(15)]
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        do_save(manager, 15)  # re-saving the step `latest` names would delete it first
    assert manager.latest() == tag_for(15)


def test_latest_pointing_nowhere_is_an_error(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    (tmp_path / "latest").write_text("step_00000042\n")
    with pytest.raises(CheckpointError, match="names 'step_00000042' but .* does not exist"):
        manager.latest()
    (tmp_path / "latest").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="not a checkpoint tag"):
        manager.latest()


def test_restore_check_names_unrestored_trainable_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    frozen_before = model[0].weight.clone()
    names = poison_trainable(model)
    assert names == ["1.weight", "1.bias"]
    assert torch.equal(model[0].weight, frozen_before)  # frozen weights are not in a checkpoint: untouched
    with pytest.raises(CheckpointError, match=r"checkpoint step_00000001: trainable parameter\(s\) not restored: 1.weight, 1.bias"):
        check_restored(model, "step_00000001")
    model[1].load_state_dict({"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    check_restored(model, "step_00000001")
