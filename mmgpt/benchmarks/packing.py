"""`mmgpt bench packing`: one sample per forward vs padded batches vs packed rows.

All three variants train (forward + backward, LoRA trainable) on the SAME samples, so their
supervised tokens/s compare the cost of the same useful work:
  batch1  the seed trainer's loop: one sample per forward (`collate([s])`);
  padded  k samples per forward (k = samples per packed row on average), right-padded to the
          longest, with an attention mask, through HF's padded LLaMA path (`attention_mask`);
  packed  rows of `max_tokens` from the streaming Packer (varlen attention, no padding).
The samples are `data/synthetic.py`'s: MultiModal-GPT's length mix in LLaMA tokens, random ids.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from mmgpt.contracts import IGNORE_INDEX, PackedBatch, TokenizedSample
from mmgpt.data.packing import Packer, PackingConfig, collate, packing_efficiency
from mmgpt.data.synthetic import synthetic_samples
from mmgpt.perf import StepShape, peak_bf16_flops, step_flops
from mmgpt.train.loss import packed_loss


@dataclass(frozen=True)
class PackingBenchOptions:
    """`mmgpt bench packing`'s settings (flags, defaults and their help: mmgpt/cli/bench.py)."""

    json: str | None
    preset: str
    device: str
    dtype: str  # float32 | bfloat16
    samples: int
    max_tokens: int
    steps: int
    attn_backend: str
    gradient_checkpointing: int  # every K-th layer; 0: off
    matrix: bool
    threads: int  # 0: torch's default
    peak_tflops: float | None
    seed: int


def padded_loss_sum(model, samples: list[TokenizedSample]) -> torch.Tensor:
    """Summed token loss of `samples` as one right-padded batch [B, L] with an attention mask.

    The padded baseline: LLaMA runs on B x L positions through transformers' masked SDPA path;
    the LM head still only sees supervised positions, so the comparison isolates padding.
    """
    from mmgpt.media import MediaLayout, media_index
    from mmgpt.models.cross_attention import MediaContext

    device = model.perceiver.latents.device
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample)
        ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, : n - 1] = torch.tensor(sample.labels[1:])
        mask[row, :n] = 1
    images = [im for s in samples for im in s.images]
    latents = model.encode_images(
        torch.stack(images).to(device) if images else model.perceiver.latents.new_zeros(0, 3, 1, 1)
    )
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    has_images = torch.tensor([bool(s.images) for s in samples])[:, None].expand(-1, width)
    index = media_index(ids, model.image_token_id, attend_previous=False)  # the default "next" mode
    media = MediaContext(latents, MediaLayout.build(index, has_images.to(device))) if images else None
    positions = torch.arange(width, device=device).expand(len(samples), width)
    hidden = model.language_model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               media=media, use_cache=False).last_hidden_state
    supervised = labels != IGNORE_INDEX
    logits = model.language_model.lm_head(hidden[supervised]).float()
    return F.cross_entropy(logits, labels[supervised], reduction="sum")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(model, steps: list[Callable[[], torch.Tensor]],
                 device: torch.device) -> tuple[float, float, float | None]:
    """Forward+backward of each step (each returns a summed loss): seconds, total loss, peak GiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    total = torch.zeros((), device=device)
    start = time.perf_counter()
    for step in steps:
        model.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        total += loss.detach().float()
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, float(total), peak


VARIANTS = ("batch1", "padded", "packed")


@dataclass
class _Work:
    """One variant's share of the timed samples: its training steps and the positions it runs."""

    steps: list[Callable[[], torch.Tensor]]
    processed_tokens: int


def _spread(row_ids: list[list[int]], steps: int) -> list[list[int]]:
    """`steps` rows evenly spaced over the stream (its first rows hold the longest samples)."""
    body = row_ids[:-1] if len(row_ids) > steps else row_ids  # the last row: drained remainder
    return [body[i * len(body) // steps] for i in range(min(steps, len(body)))]


@dataclass
class _Setup:
    """The model (random weights, built where it runs) and the packed synthetic stream."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    build_seconds: float
    side: int
    samples: list[TokenizedSample]
    row_ids: list[list[int]]  # sample indices of each packed row (the rows' images are not kept)
    efficiency: float

    @classmethod
    def prepare(cls, args: PackingBenchOptions) -> "_Setup":
        from mmgpt.models.builder import ModelConfig, build_model

        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        cfg = ModelConfig(preset=args.preset, attn_backend=args.attn_backend, seed=args.seed,
                          gradient_checkpointing=args.gradient_checkpointing)
        start = time.perf_counter()
        with torch.device(device):  # random weights are initialised where they will live
            built = build_model(cfg, device=device, dtype=dtype)
        build_seconds = time.perf_counter() - start
        model, side = built.model, built.image_size
        image = torch.randn(3, side, side, generator=torch.Generator().manual_seed(args.seed))
        samples = synthetic_samples(args.samples, vocab_size=model.language_model.config.vocab_size,
                                    image_token_id=model.image_token_id, image=image,
                                    max_tokens=args.max_tokens, seed=args.seed)
        packer = Packer(PackingConfig(max_tokens=args.max_tokens, seed=args.seed), model.image_token_id,
                        (side, side))
        row_ids: list[list[int]] = []

        def recorded() -> Iterator[PackedBatch]:
            for batch in packer.pack(samples):
                row_ids.append(batch.sample_ids)
                yield batch

        efficiency = packing_efficiency(recorded())
        return cls(model, device, dtype, build_seconds, side, samples, row_ids, efficiency)

    def collate(self, members: list[TokenizedSample], row_tokens: int = 0) -> PackedBatch:
        return collate(members, row_tokens, image_token_id=self.model.image_token_id,
                       media_attention="next", image_size=(self.side, self.side))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _peak_flops(args: PackingBenchOptions, device: torch.device) -> float | None:
    """MFU denominator: the override, else the card's bf16 peak (None on the CPU)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    return peak_bf16_flops(_device_name(device)) if device.type == "cuda" else None


# The step matrix: attention backend x activation checkpointing x liger kernels. "fused" asks for
# `auto`, which is flash_attn or torch_varlen where they fit; the JSON records what ran.
MATRIX_BACKENDS = {"sdpa": "sdpa", "fused": "auto"}
MATRIX_CHECKPOINTING = {"full": True, "off": False}


def run_step_matrix(args: PackingBenchOptions) -> dict:
    """Time the packed training step (forward + backward on `args.steps` packed rows) for every
    backend x checkpointing x liger combination on ONE built model, so the matrix costs one
    model build. Liger patches modules in place, so its "on" half runs last."""
    from mmgpt.models.fused import apply_liger

    setup = _Setup.prepare(args)
    model, device, dtype = setup.model, setup.device, setup.dtype
    rows = [[setup.samples[i] for i in ids] for ids in _spread(setup.row_ids, args.steps)]
    batches = [setup.collate(row, args.max_tokens).to(device, dtype) for row in rows]
    steps = [lambda b=b: packed_loss(model, model.lm_head, b).loss_sum for b in batches]
    timed = [s for row in rows for s in row]
    supervised = sum(s.num_supervised for s in timed)
    useful = step_flops(args.preset, StepShape.from_batch(setup.collate(timed))).train
    peak = _peak_flops(args, device)
    model.train()
    entries = []
    for liger in (False, True):
        liger_note = apply_liger(model, device) if liger else None
        for backend_name, backend in MATRIX_BACKENDS.items():
            model.set_attn_backend(backend)
            for ckpt_name, ckpt in MATRIX_CHECKPOINTING.items():
                model.set_gradient_checkpointing(ckpt)
                entry = {"attn_backend": backend_name, "gradient_checkpointing": ckpt_name,
                         "liger": liger, "liger_applied": liger and liger_note is None,
                         "liger_note": liger_note,
                         "backends_ran": model.attention_backends(dtype, device)}
                try:
                    time_variant(model, steps, device)  # warm: kernel caches, Triton compiles
                    seconds, loss, memory = time_variant(model, steps, device)
                except torch.OutOfMemoryError as err:  # checkpointing off on a small card
                    entry["error"] = f"out of memory: {err}".splitlines()[0]
                    torch.cuda.empty_cache()
                    entries.append(entry)
                    continue
                entry.update(seconds=seconds, loss_sum=loss, peak_memory_gib=memory,
                             supervised_tokens_per_s=supervised / seconds,
                             useful_tflops_per_s=useful / seconds / 1e12,
                             mfu=useful / seconds / peak if peak else None)
                entries.append(entry)
    return {"preset": args.preset, "device": _device_name(device), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "build_seconds": setup.build_seconds,
            "max_tokens": args.max_tokens, "packing_efficiency": setup.efficiency,
            "timed_rows": len(rows), "timed_samples": len(timed),
            "timed_supervised_tokens": supervised, "peak_tflops": peak / 1e12 if peak else None,
            "matrix": entries}


def _variant_work(setup: "_Setup", rows: list[list[TokenizedSample]], group: int, max_tokens: int) -> dict[str, _Work]:
    """The same samples as each variant's steps: one sample per step (batch1), `group` samples
    padded to the longest (padded), the packer's rows (packed)."""
    model, device, dtype = setup.model, setup.device, setup.dtype

    def train_step(batch: PackedBatch) -> Callable[[], torch.Tensor]:
        return lambda: packed_loss(model, model.lm_head, batch.to(device, dtype)).loss_sum

    flat = sorted((s for row in rows for s in row), key=lambda s: s.index)
    groups = [flat[i : i + group] for i in range(0, len(flat), group)]
    return {
        "batch1": _Work([train_step(setup.collate([s])) for s in flat], sum(len(s) for s in flat)),
        "padded": _Work([lambda g=g: padded_loss_sum(model, g) for g in groups],
                        sum(len(g) * max(len(s) for s in g) for g in groups)),
        "packed": _Work([train_step(setup.collate(row, max_tokens)) for row in rows], sum(len(s) for s in flat)),
    }


def _time_halves(model: torch.nn.Module, device: torch.device, halves: list[dict[str, _Work]]) -> dict[str, dict]:
    """Each variant's totals over the halves, run in alternating variant order (a drifting load
    biases none); every variant is run once untimed right before it is timed."""
    report = {name: {"seconds": 0.0, "forwards": 0, "processed_tokens": 0, "loss_sum": 0.0,
                     "peak_memory_gib": None} for name in VARIANTS}
    for h, jobs in enumerate(halves):
        for name in VARIANTS if h % 2 == 0 else VARIANTS[::-1]:
            time_variant(model, jobs[name].steps, device)  # warm: per-shape kernel caches
            seconds, loss, memory = time_variant(model, jobs[name].steps, device)
            r = report[name]
            r["seconds"] += seconds
            r["forwards"] += len(jobs[name].steps)
            r["processed_tokens"] += jobs[name].processed_tokens
            r["loss_sum"] += loss
            if memory is not None:
                r["peak_memory_gib"] = max(memory, r["peak_memory_gib"] or 0.0)
    return report


def run_packing_bench(args: PackingBenchOptions) -> dict:
    """Pack `args.samples` samples, then time the three variants on the samples of `args.steps` rows.

    The timed rows are split in two halves run in the orders batch1, padded, packed and then
    packed, padded, batch1, so a drifting load on a shared machine biases no variant. Each
    variant runs its steps once untimed right before timing them: every sample length is a new
    shape, and first-use costs (oneDNN primitives, cuBLAS heuristics) would otherwise be charged
    mostly to batch-1. Steady state is the conservative comparison for packing.
    """
    setup = _Setup.prepare(args)
    model, device, dtype = setup.model, setup.device, setup.dtype
    samples, row_ids = setup.samples, setup.row_ids
    per_row = len(samples) / len(row_ids)
    group = max(1, round(per_row))

    packed = setup.collate

    def work(rows: list[list[int]]) -> dict[str, _Work]:
        return _variant_work(setup, [[samples[i] for i in ids] for ids in rows], group, args.max_tokens)

    timed_ids = _spread(row_ids, args.steps)
    timed = [samples[i] for ids in timed_ids for i in ids]
    halves = [h for h in (timed_ids[0::2], timed_ids[1::2]) if h]
    report = _time_halves(model, device, [work(half) for half in halves])
    useful = step_flops(args.preset, StepShape.from_batch(packed(timed))).train
    peak = _peak_flops(args, device)
    supervised = sum(s.num_supervised for s in timed)
    for r in report.values():
        r["supervised_tokens_per_s"] = supervised / r["seconds"]
        r["useful_tflops_per_s"] = useful / r["seconds"] / 1e12
        r["mfu"] = useful / r["seconds"] / peak if peak else None
    tokens_per_s = {name: r["supervised_tokens_per_s"] for name, r in report.items()}
    return {
        "preset": args.preset,
        "device": _device_name(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "build_seconds": setup.build_seconds,
        "max_tokens": args.max_tokens,
        "num_samples": len(samples),
        "rows": len(row_ids),
        "samples_per_row": per_row,
        "packing_efficiency": setup.efficiency,
        "attention_backends": model.attention_backends(dtype, device),
        "timed_samples": len(timed),
        "timed_supervised_tokens": supervised,
        "timed_useful_tflop": useful / 1e12,
        "padded_batch_size": group,
        "padded_fill": report["batch1"]["processed_tokens"] / report["padded"]["processed_tokens"],
        "peak_tflops": peak / 1e12 if peak else None,
        "variants": report,
        "tokens_per_s": tokens_per_s,
        "speedup_vs_batch1": tokens_per_s["packed"] / tokens_per_s["batch1"],
        "speedup_vs_padded": tokens_per_s["packed"] / tokens_per_s["padded"],
    }


def _matrix_main(args: PackingBenchOptions) -> int:
    result = run_step_matrix(args)
    print(f"{result['device']} {result['preset']} {result['dtype']}: packed step on "
          f"{result['timed_rows']} rows of {result['max_tokens']} tokens")
    for e in result["matrix"]:
        ran = "/".join(e["backends_ran"].values())
        liger = "on" if e["liger_applied"] else ("off" if not e["liger"] else "n/a")
        what = (e["error"] if "error" in e else f"{e['supervised_tokens_per_s']:10.1f} supervised tok/s"
                + (f"  MFU {e['mfu']:.3f}" if e["mfu"] is not None else "")
                + (f"  peak {e['peak_memory_gib']:.1f} GiB" if e["peak_memory_gib"] is not None else ""))
        print(f"  {e['attn_backend']:5s} (ran {ran}) ckpt {e['gradient_checkpointing']:4s} liger {liger:3s} {what}")
    for note in sorted({e["liger_note"] for e in result["matrix"] if e["liger_note"]}):
        print(f"  liger: {note}")
    _write_json(args.json, result)
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def run(args: PackingBenchOptions) -> int:
    """`mmgpt bench packing`: print the table, write the JSON."""
    if args.matrix:
        return _matrix_main(args)
    result = run_packing_bench(args)
    print(f"{result['device']} {result['preset']} {result['dtype']}: packing efficiency "
          f"{result['packing_efficiency']:.4f} over {result['num_samples']} samples "
          f"({result['samples_per_row']:.1f} per {result['max_tokens']}-token row); "
          f"timed {result['timed_samples']} samples")
    for name, r in result["variants"].items():
        mfu = f"  MFU {r['mfu']:.3f}" if r["mfu"] is not None else ""
        mem = f"  peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
        print(f"  {name:7s} {r['supervised_tokens_per_s']:10.1f} supervised tok/s  "
              f"{r['seconds']:8.2f} s  {r['forwards']:4d} forwards{mfu}{mem}")
    print(f"  packed/batch1 {result['speedup_vs_batch1']:.2f}x  "
          f"packed/padded {result['speedup_vs_padded']:.2f}x")
    _write_json(args.json, result)
    return 0
