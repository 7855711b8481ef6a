"""Resume reads real DeepSpeed checkpoints weights-only: a planted pickle is refused and never runs.

One in-process, 1-rank (gloo) DeepSpeed ZeRO-2 bf16 engine from `create_engine` (the JSON training
uses), two saved steps through `checkpointing.save`, and `checkpointing.restore`: the exact load path of
`mmgpt train --resume auto`. The real 2-rank launch is in tests/test_launch.py.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmgpt.train import checkpointing as ckpt
from mmgpt.train.ds_config import fill_optimizer

REPO = Path(__file__).resolve().parent.parent
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
STATE = {"world": 1, "data": [{"epoch": 0, "packer": {"next_index": 7, "buffered": [3, 5]}}],
         "consecutive_nonfinite": 0}


class Planted:
    """Unpickled without restriction, this creates `marker` (what DeepSpeed's own engine does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def make_engine(lr: float, total_steps: int):
    """(model, engine, filled DeepSpeed JSON): the bundled ZeRO-2 JSON over a two-layer model."""
    from mmgpt.train.engine import create_engine

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.update(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    ds = fill_optimizer(ds, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, total_steps=total_steps, warmup_steps=1,
                        min_lr_ratio=0.1, cpu=True)
    return model, create_engine(model, ds, 0.1), ds


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(engine, model, checkpoint root with step_1 and step_2 saved, trainable weights at step 2)."""
    from mmgpt.train.engine import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
            mp.delenv(key, raising=False)
        mp.setenv("MASTER_PORT", str(port))
        init_distributed()
        torch.manual_seed(0)
        model, engine = make_engine(lr=1e-2, total_steps=10)[:2]
        manager = ckpt.CheckpointManager(tmp_path_factory.mktemp("run") / "checkpoints", keep_last=2)
        for step in (1, 2):
            engine.backward(engine(torch.randn(3, 4, dtype=torch.bfloat16)).float().square().sum())
            engine.step()
            ckpt.save(manager, engine, step, {"step": step, **STATE}, is_rank0=True, barrier=dist.barrier)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        yield engine, model, manager.root, weights
        dist.destroy_process_group()


def copy_run(root: Path, tmp_path: Path) -> ckpt.CheckpointManager:
    shutil.copytree(root, tmp_path / "checkpoints")
    return ckpt.CheckpointManager(tmp_path / "checkpoints", keep_last=2)


def plant(manager: ckpt.CheckpointManager, name: str, marker: Path) -> Path:
    """Replace `name` in the latest checkpoint by its own content plus a Planted object, and rewrite
    the manifest to match (anyone who can write the file can write the manifest too)."""
    path = manager.root / manager.latest() / name
    state = torch.load(path, weights_only=False)  # our own file, written above
    torch.save({**state, "planted": Planted(marker)}, path)
    ckpt.write_manifest(path.parent)
    return path


def test_allow_list_is_what_deepspeed_writes(trained):
    """Each allow-listed class is in the files (or, for fp16's loss scaler, round-trips), no other is."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from mmgpt.train.engine import CHECKPOINT_GLOBALS, WeightsOnlyCheckpointEngine

    engine, _, root, _ = trained
    step_dir = root / ckpt.tag_for(2)
    names = {f"{c.__module__}.{c.__qualname__}" for c in CHECKPOINT_GLOBALS if c is not DynamicLossScaler}
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(step_dir / OPTIM_STATES)) == names
    assert torch.serialization.get_unsafe_globals_in_checkpoint(step_dir / MODEL_STATES) == []
    assert isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine)
    for path in step_dir.glob("*.pt"):
        engine.checkpoint_engine.load(str(path), map_location="cpu")
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.float16)
    scaler.cur_iter = 17
    torch.save({"loss_scaler": scaler}, step_dir.parent / "fp16.pt")
    loaded = engine.checkpoint_engine.load(str(step_dir.parent / "fp16.pt"))["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler)


def test_intact_checkpoint_resumes_exactly(trained, tmp_path):
    from mmgpt.train.checkpointing import restore

    engine, model, root, weights = trained
    manager = copy_run(root, tmp_path)
    assert restore(engine, model, manager, world=1, rank=0) == (2, STATE["data"][0], 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, weights[name]), name


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_planted_pickle_is_refused_and_never_runs(trained, tmp_path, name):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from mmgpt.train.checkpointing import restore

    engine, model, root, _ = trained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    marker = tmp_path / "planted-code-ran"
    manager = copy_run(root, tmp_path)
    path = plant(manager, name, marker)
    shutil.copy(path, tmp_path / "armed.pt")  # the payload is live: DeepSpeed's own engine runs it
    TorchCheckpointEngine().load(str(tmp_path / "armed.pt"))
    assert marker.exists()
    marker.unlink()

    ckpt.verify(manager, ckpt.tag_for(1), engine.checkpoint_engine.load)  # the fallback the message offers is intact
    with pytest.raises(ckpt.CheckpointError) as err:
        restore(engine, model, manager, world=1, rank=0)
    assert str(err.value) == (
        f"checkpoint {ckpt.tag_for(2)}: {name} refused by the weights-only loader (Unsupported global: "
        f"GLOBAL io.open; nothing in it was run); refusing to resume; previous checkpoint: {ckpt.tag_for(1)} "
        f"(to resume from it, write {ckpt.tag_for(1)} into {manager.root / 'latest'})")
    assert not marker.exists()
    for n, param in model.named_parameters():  # refused before anything was loaded or poisoned
        assert torch.equal(param, before[n]), n


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_deepspeed_load_itself_is_weights_only(trained, tmp_path, name):
    """Past `verify` (a file swapped after it read it), DeepSpeed's load still refuses the pickle."""
    engine, _, root, _ = trained
    marker = tmp_path / "planted-code-ran"
    manager = copy_run(root, tmp_path)
    plant(manager, name, marker)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL io.open"):
        engine.load_checkpoint(str(manager.root), tag=manager.latest(), load_module_strict=False)
    assert not marker.exists()


def test_truncated_deepspeed_file_is_refused_by_the_manifest(trained, tmp_path):
    from mmgpt.train.checkpointing import restore

    engine, model, root, _ = trained
    manager = copy_run(root, tmp_path)
    path = manager.root / manager.latest() / OPTIM_STATES
    size = path.stat().st_size
    os.truncate(path, size // 2)
    with pytest.raises(ckpt.CheckpointError, match=(
            rf"^checkpoint {ckpt.tag_for(2)}: {OPTIM_STATES} is truncated \({size // 2} of {size} bytes\); "
            rf"refusing to resume; previous checkpoint: {ckpt.tag_for(1)} ")):
        restore(engine, model, manager, world=1, rank=0)
    (manager.root / "latest").write_text(ckpt.tag_for(1))
    assert restore(engine, model, manager, world=1, rank=0)[0] == 1


def scheduled_lr(peak: float, iteration: int, total: int, warmup: int = 2, floor: float = 0.1) -> float:
    """WarmupCosineLR's lr at `iteration` (linear warmup, then cosine to `floor` x peak), as documented."""
    if iteration < warmup:
        return peak * iteration / warmup
    progress = min(1.0, (iteration - warmup + 1) / (total - warmup))
    return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


def test_a_changed_lr_and_schedule_length_take_effect_on_resume(trained, tmp_path):
    """Resumed with a 5x peak lr and a 20-step schedule, every step from the first uses the new
    schedule at the restored position (DeepSpeed alone restores the old lr for the first step)."""
    from mmgpt.train.engine import apply_schedule
    from mmgpt.train.checkpointing import restore

    _, _, root, _ = trained
    manager = copy_run(root, tmp_path)
    model, engine, _ = make_engine(lr=5e-2, total_steps=20)
    assert restore(engine, model, manager, world=1, rank=0)[0] == 2
    iteration = engine.lr_scheduler.last_batch_iteration
    # saved after 2 steps (DeepSpeed counts from -1); not the fixture engine's current value, which
    # other tests of this module move by restoring into it
    assert iteration == 1
    assert engine.get_lr()[0] == pytest.approx(scheduled_lr(1e-2, iteration, 10))  # restored as saved
    apply_schedule(engine)
    for _ in range(3):
        assert engine.get_lr()[0] == pytest.approx(scheduled_lr(5e-2, iteration, 20))
        engine.backward(engine(torch.randn(3, 4, dtype=torch.bfloat16)).float().square().sum())
        engine.step()
        iteration += 1
    assert engine.get_lr()[0] != pytest.approx(scheduled_lr(5e-2, iteration, 10))  # the new length, too
