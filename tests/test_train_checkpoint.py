"""Checkpoint manager: atomic `latest`, keep-last-K, a failed save never moves `latest`, the
manifest check on resume, and the resume check that names a trainable parameter the checkpoint did
not restore. (Real DeepSpeed files and planted pickles: tests/test_safe_resume.py.)"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import re

import pytest
import torch
from torch import nn

from mmgpt.train.checkpointing import (MANIFEST, CheckpointError, CheckpointManager, check_restored,
                                       poison_trainable, save, tag_for, verify, write_manifest)

weights_only = functools.partial(torch.load, weights_only=True)


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
    assert sorted(p.name for p in (manager.root / tag_for(20)).iterdir()) == [MANIFEST, "part0.pt", "part1.pt",
                                                                              "part2.pt"]


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


def test_manifest_records_every_file_and_verifies(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    do_save(manager, 10)
    step_dir = manager.root / tag_for(10)
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["part0.pt", "part1.pt", "part2.pt"]
    assert files["part1.pt"]["size"] == (step_dir / "part1.pt").stat().st_size
    assert len(files["part1.pt"]["sha256"]) == 64
    verify(manager, tag_for(10), weights_only)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (_truncate, r"part1.pt is truncated \(\d+ of \d+ bytes\)"),
    (_flip_byte, r"part1.pt was altered \(sha256 differs from manifest.json\)"),
    (lambda path: path.unlink(), r"part1.pt is missing"),
    (lambda path: path.with_name("extra.pt").write_bytes(path.read_bytes()), r"extra.pt is not in manifest.json"),
])
def test_damaged_file_is_refused_naming_it_and_the_previous_checkpoint(tmp_path, damage, problem):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    do_save(manager, 10)
    do_save(manager, 20)
    damage(manager.root / tag_for(20) / "part1.pt")
    with pytest.raises(CheckpointError) as err:
        verify(manager, manager.latest(), weights_only)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {tag_for(20)}: ")
    assert re.search(problem, message), message
    assert message.endswith(f"refusing to resume; previous checkpoint: {tag_for(10)} (to resume from it, "
                            f"write {tag_for(10)} into {manager.root / 'latest'})")
    (manager.root / "latest").write_text(tag_for(10) + "\n")  # doing what the message says works
    verify(manager, manager.latest(), weights_only)


def test_damaged_only_checkpoint_says_there_is_no_fallback(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    do_save(manager, 10)
    _truncate(manager.root / tag_for(10) / "part0.pt")
    with pytest.raises(CheckpointError, match=r"part0.pt is truncated .*; no earlier checkpoint to fall back to$"):
        verify(manager, tag_for(10), weights_only)


def test_checkpoint_without_manifest_is_refused_unless_asked_naming_the_verified_step(tmp_path, caplog):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    for step in (10, 20, 30):
        do_save(manager, step)
    (manager.root / tag_for(30) / MANIFEST).unlink()  # deleted, and the weights altered
    _flip_byte(manager.root / tag_for(30) / "part1.pt")
    _flip_byte(manager.root / tag_for(20) / "part0.pt")  # step 20 does not verify either
    with pytest.raises(CheckpointError) as err:
        verify(manager, tag_for(30), weights_only)
    assert str(err.value) == (
        f"checkpoint {tag_for(30)} has no manifest.json, so its bytes cannot be verified; refusing to resume; "
        f"{tag_for(10)} is verified (to resume from it, write {tag_for(10)} into {manager.root / 'latest'}); "
        f"to resume from {tag_for(30)} anyway, pass --resume-unverified")
    with caplog.at_level(logging.WARNING, logger="mmgpt.train"):  # asked for explicitly: loaded weights-only
        verify(manager, tag_for(30), weights_only, allow_unverified=True)
    assert f"checkpoint {tag_for(30)} has no manifest.json: resuming from it unverified" in caplog.text
    _truncate(manager.root / tag_for(30) / "part2.pt")  # unverifiable, but a truncated file still fails to load
    with pytest.raises(CheckpointError, match=rf"part2.pt cannot be read \(.*\); refusing to resume; "
                                              rf"previous checkpoint: {tag_for(20)}"):
        verify(manager, tag_for(30), weights_only, allow_unverified=True)
    (manager.root / tag_for(10) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="refusing to resume; no earlier checkpoint is verified; "):
        verify(manager, tag_for(30), weights_only)


class FailingEngine(FakeEngine):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def save_checkpoint(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 133376 vs 133264"), "unexpected pos"),
])
def test_a_failed_save_names_path_cause_and_latest(tmp_path, error, cause, caplog):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    do_save(manager, 10)
    with pytest.raises(CheckpointError) as err, caplog.at_level("ERROR", logger="mmgpt.train"):
        do_save(manager, 20, FailingEngine(error))
    message = str(err.value)
    assert str(manager.root / tag_for(20)) in message and cause in message
    assert f"checkpoints/latest still names {tag_for(10)}" in message and "\n" not in message
    assert message in caplog.text  # in train.log too
    assert manager.latest() == tag_for(10)


def test_torchs_unexpected_pos_on_a_full_disk_says_no_space(tmp_path, monkeypatch):
    import shutil

    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    do_save(manager, 10)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1024, 1024))
    with pytest.raises(CheckpointError, match=r"no space left on the device \(0 MiB free\)"):
        do_save(manager, 20, FailingEngine(RuntimeError("unexpected pos 133376 vs 133264")))


def test_order_log_is_truncated_to_the_resumed_step(tmp_path):
    from mmgpt.train.checkpointing import open_order_log

    path = tmp_path / "data_order" / "rank_000.jsonl"
    with open_order_log(path, 0) as log:
        for step in range(1, 8):  # the killed run got to step 7; its checkpoint is step 5
            log.write(json.dumps({"step": step, "samples": [step]}) + "\n")
    with open_order_log(path, 5) as log:
        log.write(json.dumps({"step": 6, "samples": [60]}) + "\n")
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and json.loads(path.read_text().splitlines()[-1])["samples"] == [60]


def test_manifest_lists_every_nested_file_with_its_size_and_sha256(tmp_path):
    """The shared hasher (mmgpt/manifest.py) as a checkpoint uses it: POSIX paths, the manifest itself
    left out, each entry == hashlib over the file's bytes."""
    (tmp_path / "adapter").mkdir()
    blobs = {"mp_rank_00_model_states.pt": b"weights" * 1000, "adapter/adapter_config.json": b"{}",
             "trained_with.json": b""}
    for rel, data in blobs.items():
        (tmp_path / rel).write_bytes(data)
    write_manifest(tmp_path)
    write_manifest(tmp_path)  # a second write lists the files, never the manifest itself
    listed = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert listed == {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for rel, data in sorted(blobs.items())}
