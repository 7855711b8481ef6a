"""Distributed setup and the DeepSpeed engine around the (mostly frozen) Flamingo model.

Only trainable parameters (the LoRA matrices) reach the optimizer, so ZeRO-2 partitions LoRA
weights, gradients and Adam state, while the frozen weights stay plain replicated tensors.
Weight-decay grouping: matrices (ndim >= 2: LoRA A/B, any unfrozen projection) decay; vectors
and scalars (biases, norms, cross-attention gates) do not. Empty groups are dropped, so with
the LoRA presets there is exactly one group.

Checkpoint reads are weights-only: DeepSpeed's TorchCheckpointEngine.load calls
torch.load(weights_only=False), so a pickle planted in a checkpoint would run on every rank at
`--resume auto`. `create_engine` replaces the engine's checkpoint engine with
`WeightsOnlyCheckpointEngine`, whose load uses torch's weights-only unpickler plus the few DeepSpeed
classes ZeRO-1/2 state holds (`CHECKPOINT_GLOBALS`). Every file DeepSpeed reads on resume (model
states with our client state, each rank's ZeRO optimizer states) goes through that one method.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from mmgpt.train.config import ConfigError
from mmgpt.train.master_port import PortError, free_port

# The globals DeepSpeed's checkpoint files name beyond torch's weights-only defaults (tensors,
# storages, torch.Size, dtypes, OrderedDict), found with torch.serialization.
# get_unsafe_globals_in_checkpoint on bf16 ZeRO-2 checkpoints (plain and CPU-offload) of
# DeepSpeed 0.19.8. Each is plain data: the unpickler may only call it with pickled arguments or
# set its attributes.
CHECKPOINT_GLOBALS: list[type] = [
    LossScaler,  # ZeRO optimizer state "loss_scaler" under bf16 (static scale 1.0)
    DynamicLossScaler,  # the same under fp16 (DeepSpeed's CreateLossScaler; fp16 is GPU-only)
    ZeroStageEnum,  # ZeRO optimizer state "zero_stage", rebuilt as ZeroStageEnum(2)
    fragment_address,  # ZeRO optimizer state "param_slice_mappings": dataclass(numel, start)
]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a weights-only load (saving is unchanged).

    Why an engine rather than torch.serialization.safe_globals around load_checkpoint: DeepSpeed
    passes weights_only=False explicitly, which no context manager overrides.
    """

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group the launcher set up (gloo on the CPU accelerator, nccl on CUDA).

    Run without a launcher (plain `mmgpt train`), it becomes a 1-rank group on 127.0.0.1 (a free port).
    A busy or unreachable master port raises PortError (one line naming the port).
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ["WORLD_SIZE"] == "1":  # alone: any free port, so two such runs never meet
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("MASTER_PORT", "29500")
    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if accelerator.device_name() != "cpu":  # pick the GPU before NCCL starts, so it binds the right one
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    try:
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    except dist.DistNetworkError as err:  # torch's message is a C++ stack: keep its first line
        first = str(err).strip().splitlines()[0]
        reason = "in use by another process" if "EADDRINUSE" in first else first
        raise PortError(f"master port {os.environ['MASTER_PORT']} (MASTER_PORT) on "
                        f"{os.environ['MASTER_ADDR']}: {reason}") from None
    if accelerator.device_name() == "cpu":
        release_shm_buffer(dist.get_rank())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped it.

    DeepSpeed's shm all-reduce (ops/csrc/cpu/comm/shm.cpp) creates one 69 MB file per rank named
    after MASTER_ADDR/MASTER_PORT and never unlinks it, so with a free port per run every CPU run
    left 2 x 69 MB of RAM-backed tmpfs behind. Each rank maps all its peers' files before
    `init_distributed` returns; after a barrier the names can go (the mappings live on), so nothing
    is left even when a run is killed."""
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{rank}")
    dist.barrier()
    name.unlink(missing_ok=True)


CROSS_ATTN = "gated_cross_attn_layer."  # in the names of the gated cross-attention blocks' parameters


def param_groups(model: nn.Module, weight_decay: float, cross_attn_lr: float | None = None) -> list[dict[str, Any]]:
    """Trainable parameters only, split into decay / no-decay groups (empty groups dropped); with
    `cross_attn_lr`, the cross-attention blocks' parameters form groups of their own at that
    learning rate (the scheduler scales each group's own rate)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = []
    for cross in (False, True) if cross_attn_lr is not None else (None,):
        mine = [p for name, p in trainable if cross is None or (CROSS_ATTN in name) == cross]
        extra = {"lr": cross_attn_lr} if cross else {}
        groups += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": weight_decay, **extra},
                   {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, **extra}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (is LoRA disabled with lora: none?)")
    return groups


def model_dtype(ds: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed will cast the module to: build the model in it directly (9B in fp32 is 36 GB)."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def create_engine(model: nn.Module, ds: dict[str, Any], weight_decay: float,
                  cross_attn_lr: float | None = None) -> deepspeed.DeepSpeedEngine:
    """deepspeed.initialize with the optimizer and scheduler named in the (filled) JSON, reading
    checkpoints weights-only (see the module docstring)."""
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay, cross_attn_lr),
                                      config=ds)
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ConfigError(f"DeepSpeed chose {type(engine.checkpoint_engine).__name__} (a checkpoint writer "
                          "or datastates config): only the default torch checkpoint engine can be made to "
                          "load weights-only; remove that section from the DeepSpeed JSON")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
    return engine


def apply_schedule(engine: deepspeed.DeepSpeedEngine) -> None:
    """Make a restored engine use its own (new) schedule from the current step on.

    The scheduler is built from this run's JSON (peak lr, length) and its saved state is only the
    step counter, but DeepSpeed restores the optimizer's param groups with the lr they had when
    saved, and the scheduler sets them again only after the next step: the first resumed step
    would use the old lr. Setting the current step's lr now closes that gap.
    """
    scheduler = engine.lr_scheduler
    if not hasattr(scheduler, "last_batch_iteration"):
        raise ConfigError(f"the schedule changed on resume but the DeepSpeed scheduler "
                          f"{type(scheduler).__name__} cannot be moved to the restored step: keep the old settings")
    scheduler.step(scheduler.last_batch_iteration)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks in one collective (float64: exact for token counts)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_min(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def all_gather(obj: Any, world: int) -> list[Any]:
    """Small Python objects from every rank (data positions, data reports), indexed by rank."""
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
