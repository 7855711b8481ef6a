"""`mmgpt bench`: one sub-command per benchmark module (each has `run(options)`, its typed settings)."""
from __future__ import annotations

import argparse

from mmgpt.cli import lazy
from mmgpt.models.preset_names import preset_help


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: print and write JSON")
    benches = parser.add_subparsers(dest="bench", required=True)

    p = benches.add_parser("packing", help="batch-1 vs padded vs packed training throughput")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--preset", default="small", help=f"model preset ({preset_help()})")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype")
    p.add_argument("--samples", type=int, default=2000, help="samples packed for the efficiency")
    p.add_argument("--max-tokens", type=int, default=4096, help="packed row capacity")
    p.add_argument("--steps", type=int, default=2, help="packed rows whose samples are timed")
    p.add_argument("--attn-backend", default="auto", help="mmgpt_kernels backend")
    p.add_argument("--gradient-checkpointing", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="checkpoint every K-th layer (bare flag: every layer; 0: off)")
    p.add_argument("--matrix", action="store_true",
                   help="packed step only, for backend {sdpa, fused} x checkpointing {full, off} x "
                        "liger {off, on} on one built model")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator override")
    p.add_argument("--seed", type=int, default=0, help="sample and weight seed")
    p.set_defaults(func=lazy("mmgpt.benchmarks.packing:run", "PackingBenchOptions"))

    o = benches.add_parser("ops", help="aten ops (and time) of one packed row's forward+backward, op histogram")
    o.add_argument("--json", help="write the results to this JSON file")
    o.add_argument("--preset", nargs="+", default=["tiny"],
                   help="model presets (tiny, small, 9b-layout: tiny widths at the 9B's depth, ...)")
    o.add_argument("--max-tokens", type=int, default=4096, help="packed row capacity")
    o.add_argument("--samples", type=int, default=400, help="synthetic samples packed (the middle row is measured)")
    o.add_argument("--attn-backend", default="auto", help="mmgpt_kernels backend")
    o.add_argument("--gradient-checkpointing", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="checkpoint every K-th layer (bare flag: every layer; 0: off)")
    o.add_argument("--repeats", type=int, default=3, help="timed steps after the profiled one")
    o.add_argument("--compare", action="store_true",
                   help="also the sdpa backend's per-segment path (row plans off), timed interleaved")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    o.add_argument("--seed", type=int, default=0, help="sample and weight seed")
    o.set_defaults(func=lazy("mmgpt.benchmarks.ops:run", "OpsBenchOptions"))

    t = benches.add_parser("train", help="the real DeepSpeed training step: time, tokens/s, MFU, data wait, ops")
    t.add_argument("--json", help="write the results to this JSON file")
    t.add_argument("--preset", default="small", help=f"model preset ({preset_help()})")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    t.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    t.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    t.add_argument("--workers", type=int, choices=[0, 1], default=1, help="data workers (0: in-process)")
    t.add_argument("--grad-accum", type=int, default=2, help="micro-batches (packed rows) per step")
    t.add_argument("--max-tokens", type=int, default=None, help="row capacity (default: min(2048, preset max))")
    t.add_argument("--records", type=int, default=400, help="`mmgpt data sample` records written")
    t.add_argument("--deepspeed", help="DeepSpeed JSON (default: the bundled zero2.json, bf16)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing")
    t.add_argument("--attn-backend", default="auto", help="mmgpt_kernels backend")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    t.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator override (one device)")
    t.set_defaults(func=lazy("mmgpt.benchmarks.train:run", "TrainBenchOptions"))
