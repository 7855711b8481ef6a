"""`mmgpt bench ops`: aten ops per packed row, forward + backward (issue 10).

On a GPU the step time of a small-batch LLaMA is often the host's: every dispatched aten op costs
microseconds of Python and dispatcher work whatever its size. This counts them, as
`mmgpt bench train` does (every `aten::` event under torch.profiler, nested ones included), for
one packed row: the loss forward (LM head on the supervised positions) and its backward, LoRA
trainable, activation checkpointing off unless asked. It also prints the op-name histogram and
times the same step outside the profiler.

The row is realistic: `data/synthetic.py`'s samples (MultiModal-GPT's length mix: captions, VQA,
LLaVA answers with one image each, text-only Dolly/Alpaca/Baize) packed by the streaming packer
into rows of `--max-tokens`; the row measured is the middle one of the stream, and its sample
indices are written to the JSON so that another revision can rebuild the same row.

`--preset 9b-layout` is the tiny preset's widths with OpenFlamingo-9B's depth (32 LLaMA layers, a
cross-attention block before every 4th): the 9B's op count on a CPU (ops per layer do not depend
on widths).

`--compare` also runs the sdpa backend's per-segment path (row plans off,
`mmgpt_kernels.varlen.ROW_PLANS = False`) on the same model and row, and times the two paths
interleaved (A B B A ...), reporting the minimum and median of each: on a shared machine a
drifting load then biases neither.
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

LAYOUT_PRESETS = {"9b-layout": ("tiny", dict(num_hidden_layers=32), 4)}
SDPA_OP = "aten::scaled_dot_product_attention"


def preset_for(name: str):
    """(base preset name, Preset) for a model preset or a depth override such as `9b-layout`."""
    from mmgpt.models.builder import get_preset

    if name not in LAYOUT_PRESETS:
        return name, get_preset(name)
    base, llama, every = LAYOUT_PRESETS[name]
    preset = get_preset(base)
    return base, replace(preset, llama={**preset.llama, **llama}, cross_attn_every_n_layers=every)


def row_samples(model, side: int, max_tokens: int, seed: int, pool: int):
    """(all synthetic samples, the sample indices of the measured row, packing rows seen)."""
    from mmgpt.data.synthetic import synthetic_samples
    from mmgpt.data.packing import Packer, PackingConfig

    image = torch.randn(3, side, side, generator=torch.Generator().manual_seed(seed))
    samples = synthetic_samples(pool, vocab_size=model.language_model.config.vocab_size,
                                image_token_id=model.image_token_id, image=image,
                                max_tokens=max_tokens, seed=seed)
    rows = [b.sample_ids for b in Packer(PackingConfig(max_tokens=max_tokens, seed=seed),
                                         model.image_token_id, (side, side)).pack(samples)]
    body = rows[:-1] if len(rows) > 1 else rows  # the last row is the drained remainder
    return samples, list(body[len(body) // 2]), len(rows)


def count_ops(step) -> dict[str, Any]:
    """Profile one call of `step` (forward + backward) after a warm-up."""
    step()  # warm-up: lazy initialisation, oneDNN primitives
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    return {"aten_ops": sum(names.values()), "sdpa_calls": names[SDPA_OP],
            "top_ops": dict(names.most_common(20))}


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


@contextmanager
def row_plans(enabled: bool):
    """The sdpa backend with (the default) or without its row plans (the per-segment path)."""
    from mmgpt_kernels import varlen

    saved = varlen.ROW_PLANS
    varlen.ROW_PLANS = saved and enabled
    try:
        yield
    finally:
        varlen.ROW_PLANS = saved


def _time_summary(times: list[float]) -> dict[str, Any]:
    return {"step_time_s": statistics.median(times), "step_time_min_s": min(times), "step_times_s": times}


@dataclass(frozen=True)
class OpsBenchOptions:
    """`mmgpt bench ops`'s settings (flags, defaults and their help: mmgpt/cli/bench.py)."""

    json: str | None
    preset: list[str]  # one measurement each
    max_tokens: int
    samples: int
    attn_backend: str
    gradient_checkpointing: int  # every K-th layer; 0: off
    repeats: int
    compare: bool
    threads: int  # 0: torch's default
    seed: int


def run_ops_bench(args: OpsBenchOptions, preset_name: str) -> dict[str, Any]:
    """The counts and times of one preset's packed row."""
    from mmgpt.data.packing import collate
    from mmgpt.models.builder import ModelConfig, build_model
    from mmgpt.train.loss import packed_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    base, preset = preset_for(preset_name)
    cfg = ModelConfig(preset=base, attn_backend=args.attn_backend, seed=args.seed,
                      gradient_checkpointing=args.gradient_checkpointing)
    built = build_model(cfg, preset=preset)
    model, side = built.model, built.image_size
    model.train()
    samples, ids, num_rows = row_samples(model, side, args.max_tokens, args.seed, args.samples)
    members = [samples[i] for i in ids]
    batch = collate(members, args.max_tokens, image_token_id=model.image_token_id,
                    media_attention="next", image_size=(side, side))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        packed_loss(model, model.lm_head, batch).loss_sum.backward()

    variants = {"planned": True, "per_segment": False} if args.compare else {"planned": True}
    counts = {}
    for name, enabled in variants.items():
        with row_plans(enabled):
            counts[name] = count_ops(step)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for i in range(args.repeats):  # interleaved, the order flipped every round
        for name in order if i % 2 == 0 else order[::-1]:
            with row_plans(variants[name]):
                times[name].append(_timed(step))
    for name in variants:
        counts[name].update(_time_summary(times[name]))
    config = model.language_model.config
    return {
        "preset": preset_name,
        "layers": config.num_hidden_layers,
        "cross_attention_layers": len(model.cross_attn_blocks()),
        "hidden_size": config.hidden_size,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "attn_backend": args.attn_backend,
        "backends_ran": model.attention_backends(torch.float32, "cpu"),
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "row_tokens": len(batch.input_ids),
        "row_samples": len(members),
        "row_images": int(batch.images.shape[0]),
        "row_sample_ids": ids,
        "row_sample_lengths": [len(s) for s in members],
        "row_sample_is_vl": [bool(s.images) for s in members],
        "packed_rows_in_stream": num_rows,
        **counts["planned"],
        **({"per_segment": counts["per_segment"]} if args.compare else {}),
    }


def run(args: OpsBenchOptions) -> int:
    """`mmgpt bench ops`: print the counts, write the JSON."""
    results = []
    for name in args.preset:
        r = run_ops_bench(args, name)
        results.append(r)
        print(f"{r['preset']} ({r['layers']} layers, {r['cross_attention_layers']} cross-attention): "
              f"row of {r['row_tokens']} tokens, {r['row_samples']} samples, {r['row_images']} images; "
              f"ckpt {r['gradient_checkpointing']}, backend {r['attn_backend']}")
        for label, c in (("", r), ("per-segment path: ", r.get("per_segment"))):
            if c is not None:
                print(f"  {label}{c['aten_ops']} aten ops per forward+backward ({c['sdpa_calls']} SDPA), "
                      f"step {c['step_time_s']:.3f} s median, {c['step_time_min_s']:.3f} s min "
                      f"of {len(c['step_times_s'])}")
        for op, n in r["top_ops"].items():
            print(f"    {n:7d}  {op}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2) + "\n")
    return 0
