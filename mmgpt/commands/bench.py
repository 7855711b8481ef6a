"""`mmgpt bench` parsers: one sub-command per benchmark module (each has `run(args)`)."""
from __future__ import annotations

import argparse

from mmgpt.commands import lazy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (not tests)")
    benches = parser.add_subparsers(dest="bench", required=True)

    p = benches.add_parser("packing", help="batch-1 vs padded vs packed training throughput")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--preset", default="small", help="model preset (tiny, small, 9b)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype")
    p.add_argument("--samples", type=int, default=2000, help="samples packed for the efficiency")
    p.add_argument("--max-tokens", type=int, default=4096, help="packed row capacity")
    p.add_argument("--steps", type=int, default=2, help="packed rows whose samples are timed")
    p.add_argument("--attn-backend", default="auto", help="mmgpt_kernels backend")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator override")
    p.add_argument("--seed", type=int, default=0, help="sample and weight seed")
    p.set_defaults(func=lazy("mmgpt.benchmarks.packing:run"))
