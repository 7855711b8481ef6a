"""`mmgpt plan`: predicted peak GPU memory per rank of a training run, and what fits which card.

Three parts, per rank:
  weights      every parameter (frozen and LoRA) in bf16, counted on the meta-built model.
  optimizer    the LoRA parameters under DeepSpeed ZeRO-2: fp32 master copy + Adam's two fp32
               moments + the fp32 gradient partition, 16 bytes per trainable parameter split over
               the world, plus the gradient reduction buckets (`reduce_bucket_size` bf16 elements,
               two with `overlap_comm`), read from the run's DeepSpeed JSON. With the optimizer
               offloaded only the buckets stay on the card.
  activations  MEASURED, not guessed: one forward + backward of a packed row of `max_tokens` (the
               length mix of data/synthetic.py, images included, built by the training packer) through
               the real model on the `meta` device, where the fused CUDA attention kernels run
               through their meta functions (mmgpt_kernels.varlen), under `PeakMemory`, a dispatch
               mode that adds every new storage's bytes while it is alive and keeps the peak: what
               the CUDA caching allocator's `max_memory_allocated` counts above the weights.
               Measured for each checkpointing mode at `max_tokens` and at half of it; the
               largest `max_tokens` that fits follows from the line through the two points.
Not counted (`RESERVED_GIB` of headroom instead): the CUDA context, cuBLAS / NCCL workspaces and
the caching allocator's fragmentation, none of which are tensors.
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmgpt.contracts import PackedBatch
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size

GIB = 2**30
# Total memory per card as nvidia-smi reports it (MiB / 1024).
GPUS: dict[str, float] = {"a100-40gb": 40.0, "a100-80gb": 80.0, "h100-80gb": 79.6, "h200": 140.4}
RESERVED_GIB = 2.0  # CUDA context + cuBLAS/NCCL workspaces + allocator fragmentation (not tensors)
CHECKPOINTING: dict[str, bool | int] = {"off": False, "every_2": 2, "full": True}
OPTIMIZER_BYTES_PER_PARAM = 4 + 8 + 4  # fp32 master, Adam m and v, fp32 gradient partition
PARAM_BYTES = 2  # bf16
TOKEN_STEP = 128  # the largest fitting max_tokens is rounded down to this


def gpu_memory_gib(spec: str) -> float:
    """Card memory in GiB from a name in GPUS or `<N>GiB`."""
    if spec.lower() in GPUS:
        return GPUS[spec.lower()]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*GiB", spec.strip(), re.IGNORECASE)
    if match is None:
        raise ValueError(f"--gpu {spec!r}: expected one of {', '.join(GPUS)} or <N>GiB (e.g. 24GiB)")
    return float(match[1])


class PeakMemory(TorchDispatchMode):
    """Bytes of the storages created inside the mode while they are alive, and their peak.

    Hand-written because torch's `torch.distributed._tools.mem_tracker.MemTracker` registers a
    gradient hook on every parameter and refuses frozen ones. Storages that exist before (weights,
    the batch) are never counted, even when an op returns a view of them."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}
        for tensor in existing:
            self._track(tensor.untyped_storage(), counted=False)

    def _track(self, storage: torch.UntypedStorage, counted: bool) -> None:
        key = id(storage)  # storages keep their Python object while alive, so the id is stable
        if key in self._bytes:
            return
        self._bytes[key] = storage.nbytes() if counted else 0
        self.live += self._bytes[key]
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage(), counted=True)
        self.peak = max(self.peak, self.live)
        return out


def packed_row(preset: str, max_tokens: int, vocab_size: int, image_token_id: int) -> PackedBatch:
    """The fullest row the training packer makes of data/synthetic.py's length mix at `max_tokens`."""
    from mmgpt.data.synthetic import synthetic_samples
    from mmgpt.data.packing import Packer, PackingConfig

    side = preset_image_size(preset)
    image = torch.zeros(3, side, side)
    samples = synthetic_samples(max(64, max_tokens // 40), vocab_size=vocab_size, image_token_id=image_token_id,
                                image=image, max_tokens=max_tokens)
    rows = Packer(PackingConfig(max_tokens=max_tokens), image_token_id, (side, side)).pack(samples)
    return max(rows, key=lambda b: (b.num_tokens, b.images.shape[0]))


def activation_bytes(model: torch.nn.Module, batch: PackedBatch, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes above the weights of one packed forward + backward of `batch` (model on meta)."""
    from mmgpt.train.loss import packed_loss

    batch = batch.to("meta", dtype)
    tracker = PeakMemory([*model.parameters(), *model.buffers(), batch.input_ids, batch.images])
    with tracker:
        packed_loss(model, model.lm_head, batch).loss_sum.backward()
    model.zero_grad(set_to_none=True)
    return tracker.peak


@dataclass(frozen=True)
class Measured:
    """Activation peaks of one checkpointing mode at two row sizes; linear in between and beyond."""

    tokens: tuple[int, int]
    peak_bytes: tuple[int, int]

    def at(self, tokens: int) -> float:
        (t0, t1), (b0, b1) = self.tokens, self.peak_bytes
        return b0 + (b1 - b0) * (tokens - t0) / (t1 - t0)

    def largest_fitting(self, budget_bytes: float) -> int:
        (t0, t1), (b0, b1) = self.tokens, self.peak_bytes
        slope = (b1 - b0) / (t1 - t0)
        if budget_bytes < self.at(0) or slope <= 0:
            return 0
        return int((budget_bytes - self.at(0)) / slope) // TOKEN_STEP * TOKEN_STEP


def measure_modes(cfg: ModelConfig, max_tokens: int) -> dict[str, Measured]:
    """Activation peaks of every CHECKPOINTING mode at max_tokens // 2 and max_tokens."""
    from mmgpt.preflight import without_files

    model = build_model(without_files(cfg), meta=True).model
    model.to(torch.bfloat16)
    vocab = model.language_model.config.vocab_size
    sizes = (max_tokens // 2, max_tokens)
    rows = [packed_row(cfg.preset, t, vocab, model.image_token_id) for t in sizes]
    measured = {}
    for name, mode in CHECKPOINTING.items():
        model.set_gradient_checkpointing(mode)
        peaks = tuple(activation_bytes(model, row) for row in rows)
        measured[name] = Measured(tuple(row.num_tokens for row in rows), peaks)
    return measured


def static_bytes(cfg: ModelConfig, world: int, ds: dict) -> tuple[int, int]:
    """(weights, LoRA gradients + optimizer) bytes per rank under the DeepSpeed JSON `ds`."""
    from mmgpt.preflight import without_files

    model = build_model(without_files(cfg), meta=True).model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    buckets = int(float(zero.get("reduce_bucket_size", 5e8))) * (2 if zero.get("overlap_comm") else 1)
    optimizer = 0 if offload else trainable * OPTIMIZER_BYTES_PER_PARAM // world
    return total * PARAM_BYTES, optimizer + buckets * PARAM_BYTES


def plan(cfg: ModelConfig, max_tokens: int, world: int, gpu: str, ds: dict,
         measured: dict[str, Measured] | None = None) -> dict:
    """The plan as JSON-ready data: per-rank parts and, per checkpointing mode, the activations
    and peak at `max_tokens`, whether it fits and the largest `max_tokens` that does."""
    total_gib = gpu_memory_gib(gpu)
    weights, optimizer = static_bytes(cfg, world, ds)
    measured = measured if measured is not None else measure_modes(cfg, max_tokens)
    budget = (total_gib - RESERVED_GIB) * GIB - weights - optimizer
    modes = {}
    for name, m in measured.items():
        act = m.at(max_tokens)
        peak = (weights + optimizer + act) / GIB
        modes[name] = {"activations_gib": act / GIB, "peak_gib": peak, "fits": act <= budget,
                       "largest_max_tokens": m.largest_fitting(budget),
                       "measured_tokens": list(m.tokens),
                       "measured_activations_gib": [b / GIB for b in m.peak_bytes]}
    configured = {v: k for k, v in CHECKPOINTING.items()}.get(cfg.gradient_checkpointing)
    return {"preset": cfg.preset, "gpu": gpu, "gpu_memory_gib": total_gib, "reserved_gib": RESERVED_GIB,
            "world_size": world, "max_tokens": max_tokens, "weights_gib": weights / GIB,
            "lora_grads_optimizer_gib": optimizer / GIB, "configured_checkpointing": configured,
            "checkpointing": modes}


def plan_lines(result: dict) -> list[str]:
    """The plan as a short table, one line per checkpointing mode."""
    lines = [f"{result['preset']} on {result['gpu']} ({result['gpu_memory_gib']:.1f} GiB, "
             f"{result['reserved_gib']:.1f} reserved), world {result['world_size']}, max_tokens "
             f"{result['max_tokens']}: weights {result['weights_gib']:.2f} GiB + LoRA grads/optimizer "
             f"{result['lora_grads_optimizer_gib']:.2f} GiB per rank"]
    for name, m in result["checkpointing"].items():
        mark = " (configured)" if name == result["configured_checkpointing"] else ""
        lines.append(f"  checkpointing {name:8s} activations {m['activations_gib']:6.2f} GiB  peak "
                     f"{m['peak_gib']:6.2f} GiB  {'fits' if m['fits'] else 'DOES NOT FIT'}  largest "
                     f"max_tokens {m['largest_max_tokens']}{mark}")
    return lines


def verdict(result: dict) -> str | None:
    """One line saying that the configured run fits (with its margin); None when it does not."""
    configured = result["configured_checkpointing"]
    mode = result["checkpointing"].get(configured)
    if mode is None or not mode["fits"]:
        return None
    usable = result["gpu_memory_gib"] - result["reserved_gib"]
    return (f"the configured run fits on {result['gpu']}: peak {mode['peak_gib']:.2f} of {usable:.1f} "
            f"usable GiB per rank (checkpointing {configured}, packing.max_tokens={result['max_tokens']})")


def advice(result: dict) -> str | None:
    """None when the configured run fits; else which setting to change."""
    modes = result["checkpointing"]
    if verdict(result) is not None:
        return None
    fitting = [n for n, m in modes.items() if m["fits"]]
    value = {"off": "false", "every_2": "2", "full": "true"}
    where = f"the run will not fit on {result['gpu']} at packing.max_tokens={result['max_tokens']}"
    if fitting:
        return f"{where}: set model.gradient_checkpointing: {value[fitting[0]]}"
    best = max(modes["full"]["largest_max_tokens"], 0)
    return (f"{where} with any checkpointing: set packing.max_tokens <= {best} with "
            f"model.gradient_checkpointing: true, or use a larger card / zero2_offload.json"
            if best else f"{where}: the weights alone do not fit; use a larger card")


@dataclass(frozen=True)
class PlanOptions:
    """What `mmgpt plan` plans for (flags and defaults: mmgpt/cli/plan.py)."""

    config: str  # train config (YAML/JSON)
    overrides: list[str]  # KEY=VALUE, as for mmgpt train
    world_size: int  # ranks sharing the ZeRO-2 optimizer state
    gpu: str  # a card name or <N>GiB (gpu_memory_gib)
    json: Path | None  # also write the plan here


def run(args: PlanOptions) -> int:
    """`mmgpt plan`: print the plan and its verdict (and write it as JSON)."""
    from mmgpt.train.config import TrainConfig
    from mmgpt.train.ds_config import load_ds_config

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    gpu_memory_gib(args.gpu)  # a bad --gpu fails before the minute of measuring
    result = plan(cfg.model, cfg.packing.max_tokens, args.world_size, args.gpu, load_ds_config(cfg.deepspeed))
    print("\n".join(plan_lines(result)))
    note = advice(result)
    print(f"warning: {note}" if note is not None else verdict(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
