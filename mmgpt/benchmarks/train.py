"""`mmgpt bench train`: the real training step, timed, in one process.

What `mmgpt train` runs, on a world of one rank (a gloo group on CPU, NCCL on a GPU): the DeepSpeed
ZeRO-2 engine with its optimizer step, the global-token loss, and the BatchLoader (a background
worker unless --workers 0) reading `mmgpt data sample` records from files, decoding their images,
tokenising and packing them. After `--warmup` untimed steps it times `--steps` steps (step time,
tokens/s, supervised tokens/s, MFU, the share of the step spent waiting for data, peak memory),
then runs one more step under torch.profiler to count aten ops and host syncs per step.

Host syncs: on CUDA, the runtime's synchronisation calls; on CPU, the ops that would make the host
wait on a device, `aten::_local_scalar_dense` (every `.item()`, `float(t)`, `bool(t)`),
`aten::nonzero` (output size) and `aten::equal`: an upper bound, as host tensors count too.
MFU on CPU divides by a nominal peak (`--peak-tflops`, default the config's `cpu_peak_flops`),
so it compares runs on one machine only.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmgpt.data.packing import PackingConfig
from mmgpt.data.sample import write_sample
from mmgpt.models.builder import ModelConfig, get_preset, preset_image_size
from mmgpt.train.config import DS_CONFIG_DIR, ScheduleConfig, TrainConfig
from mmgpt.train.monitor import StepMetrics, device_peak_flops, peak_memory_gib

if TYPE_CHECKING:  # imported where used: deepspeed must not load before DS_ACCELERATOR is set
    from mmgpt.train.engine import DistInfo
    from mmgpt.train.loop import Trainer

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal")
CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_counts(prof: torch.profiler.profile, cuda: bool) -> dict[str, Any]:
    """aten ops (every dispatched aten:: call, nested ones included) and host syncs in a profile.

    On CUDA the syncs are the runtime's synchronisation calls; on CPU, the aten ops that would
    sync on a device: an upper bound, since reads of host tensors (batch shapes) count too.
    """
    names = [e.name for e in prof.events()]
    found = {op: names.count(op) for op in (CUDA_SYNC_CALLS if cuda else SYNC_OPS)}
    return {"aten_ops": sum(1 for n in names if n.startswith("aten::")),
            "host_syncs": sum(found.values()), "host_sync_ops": {op: n for op, n in found.items() if n}}


@dataclass(frozen=True)
class TrainBenchOptions:
    """`mmgpt bench train`'s settings (flags, defaults and their help: mmgpt/cli/bench.py)."""

    json: str | None
    preset: str
    device: str  # auto | cpu | cuda
    steps: int  # timed optimizer steps
    warmup: int  # untimed optimizer steps first
    workers: int
    grad_accum: int
    max_tokens: int | None  # None: min(2048, the preset's context)
    records: int  # `mmgpt data sample` records written
    deepspeed: str | None  # None: the bundled zero2.json
    gradient_checkpointing: bool
    attn_backend: str
    threads: int  # 0: torch's default
    peak_tflops: float | None


def bench_config(args: TrainBenchOptions, tmp: Path) -> TrainConfig:
    """A run of `mmgpt data sample` records in `tmp`, long enough for the warm-up and timed steps."""
    max_tokens = args.max_tokens or min(2048, get_preset(args.preset).llama["max_position_embeddings"])
    mixture = write_sample(tmp / "data", records=args.records, max_length=max_tokens,
                           image_size=preset_image_size(args.preset))
    return TrainConfig(
        mixture=str(mixture), output_dir=str(tmp / "out"),
        deepspeed=args.deepspeed or str(DS_CONFIG_DIR / "zero2.json"),
        model=ModelConfig(preset=args.preset, attn_backend=args.attn_backend,
                          gradient_checkpointing=args.gradient_checkpointing),
        packing=PackingConfig(max_tokens=max_tokens, max_images_per_row=16, buffer_size=64),
        schedule=ScheduleConfig(lr=1e-4, grad_accum=args.grad_accum, epochs=1000,
                                max_steps=args.warmup + args.steps + 1),
        data_workers=args.workers, save_every=10**9)


def time_steps(trainer: Trainer, args: TrainBenchOptions, cuda: bool) -> tuple[list[StepMetrics], dict[str, Any]]:
    """The timed steps' metrics (after the warm-up), and the op counts of one more, profiled step."""
    for _ in range(args.warmup):
        trainer.train_step()
    timed = [trainer.train_step() for _ in range(args.steps)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.train_step()
    return timed, profile_counts(prof, cuda)


def run_train_bench(args: TrainBenchOptions) -> dict[str, Any]:
    """Build the run as `mmgpt train` does (TrainRecipe), time its steps, profile one; the results."""
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    os.environ["DS_ACCELERATOR"] = device  # before deepspeed loads
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)

    import torch.distributed as dist

    from mmgpt.train import engine as eng
    from mmgpt.train.recipe import TrainRecipe

    with tempfile.TemporaryDirectory(prefix="mmgpt-bench-train-") as tmp:
        cfg = bench_config(args, Path(tmp))
        recipe = TrainRecipe(cfg)
        ds, _ = recipe.validate()
        info = eng.init_distributed()
        Path(cfg.output_dir).mkdir(parents=True)
        trainer = recipe.setup(info)
        timed, counts = time_steps(trainer, args, info.device.type == "cuda")
        trainer.stream.close()
        trainer.monitor.close()
        dist.destroy_process_group()
    return results(args, cfg, ds, info, timed, counts)


def results(args: TrainBenchOptions, cfg: TrainConfig, ds: dict[str, Any], info: DistInfo,
            timed: list[StepMetrics], counts: dict[str, Any]) -> dict[str, Any]:
    """The report: the run's settings, then per-step means over the timed steps."""
    from mmgpt.train import engine as eng

    seconds = sum(m.step_time for m in timed)
    peak, peak_source = device_peak_flops(args.peak_tflops * 1e12 if args.peak_tflops else None,
                                          cfg.cpu_peak_flops)
    flops = sum(m.flops for m in timed)
    return {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "world": info.world,
        "dtype": str(eng.model_dtype(ds)).removeprefix("torch."),
        "deepspeed": Path(cfg.deepspeed).name,
        "data_workers": args.workers,
        "grad_accum": args.grad_accum,
        "max_tokens": cfg.packing.max_tokens,
        "gradient_checkpointing": args.gradient_checkpointing,
        "attn_backend": args.attn_backend,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_time_s": seconds / len(timed),
        "step_time_median_s": statistics.median(m.step_time for m in timed),
        "tokens_per_s": sum(m.tokens for m in timed) / seconds,
        "supervised_tokens_per_s": sum(m.supervised for m in timed) / seconds,
        "samples_per_s": sum(m.samples for m in timed) / seconds,
        "packing_efficiency": sum(m.tokens for m in timed) / sum(m.capacity for m in timed),
        "train_tflop_per_step": flops / len(timed) / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "peak_source": peak_source,
        "data_wait_s": sum(m.data_wait for m in timed) / len(timed),
        "data_wait_share": sum(m.data_wait for m in timed) / seconds,
        "peak_memory_gib": peak_memory_gib(),
        "skipped_steps": sum(m.skipped for m in timed),
        "aten_ops_per_step": counts["aten_ops"],
        "host_syncs_per_step": counts["host_syncs"],
        "host_sync_ops": counts["host_sync_ops"],
    }


def run(args: TrainBenchOptions) -> int:
    """`mmgpt bench train`: print the lines, write the JSON."""
    r = run_train_bench(args)
    mfu = f"{r['mfu']:.4f} ({r['peak_source']})" if r["mfu"] is not None else "n/a (unknown peak)"
    print(f"{r['device']} {r['preset']} {r['dtype']} ZeRO-2, world {r['world']}, {r['threads']} threads, "
          f"{r['data_workers']} data worker(s), {r['grad_accum']} x {r['max_tokens']}-token rows per step")
    print(f"  step time      {r['step_time_s']:.3f} s (median {r['step_time_median_s']:.3f} s, "
          f"{r['timed_steps']} steps after {r['warmup_steps']} warm-up)")
    print(f"  tokens/s       {r['tokens_per_s']:.1f}  supervised {r['supervised_tokens_per_s']:.1f}  "
          f"samples {r['samples_per_s']:.2f}  packing eff {r['packing_efficiency']:.3f}")
    print(f"  MFU            {mfu}")
    print(f"  data wait      {r['data_wait_s']:.4f} s per step ({r['data_wait_share']:.1%} of the step)")
    print(f"  peak memory    {r['peak_memory_gib']:.2f} GiB")
    print(f"  per step       {r['aten_ops_per_step']} aten ops, {r['host_syncs_per_step']} host syncs "
          f"{r['host_sync_ops']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0
