"""`mmgpt eval` (the evaluation lives in mmgpt/eval/benchmark.py)."""
from __future__ import annotations

import argparse

from mmgpt.cli import lazy
from mmgpt.cli.chat import add_model_args, model_command
from mmgpt.names import TASK_NAMES

SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on VQAv2/OK-VQA, A-OKVQA, OCR-VQA, COCO captions "
                                            "or LLaVA-format questions")
    add_model_args(p)
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--images", required=True, help="image root the files' image paths are relative to")
    p.add_argument("--questions", help="vqa: VQAv2/OK-VQA questions json")
    p.add_argument("--annotations", help="vqa: VQAv2/OK-VQA annotations json")
    p.add_argument("--data", help="aokvqa / ocrvqa / coco_caption / llava: the dataset file")
    p.add_argument("--split", help="aokvqa: image folder split (default val); ocrvqa: train|val|test "
                                   "(default test); Karpathy dataset_coco.json: split (default test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--shots", type=int, default=0, help="in-context demonstrations from the train split, in "
                   "OpenFlamingo's prompt format (vqa, ocrvqa, coco_caption); 0: mmgpt's instruction prompt")
    p.add_argument("--seed", type=int, default=42, help="--shots: seed of the demonstrations' draw")
    p.add_argument("--query-set-size", type=int, default=2048, help="--shots: train items to draw from")
    p.add_argument("--demo-split", default="train", help="--shots: split of --data the demonstrations come from")
    p.add_argument("--demo-data", help="--shots: another dataset file for the demonstrations (default --data)")
    p.add_argument("--demo-questions", help="--shots with vqa: the train questions json")
    p.add_argument("--demo-annotations", help="--shots with vqa: the train annotations json")
    p.add_argument("--demo-images", help="--shots: the demonstrations' image root (default --images)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    p.add_argument("--workers", type=int, default=2, help="image loading processes (0: in the main one)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 10 (vqa, aokvqa, llava), "
                                                                    "16 (ocrvqa), 30 (coco_caption)")
    p.add_argument("--answer-hint", default=SHORT_ANSWER_HINT,
                   help="`### Input:` of question prompts ('' leaves it out)")
    p.add_argument("--no-meteor", action="store_true", help="coco_caption: skip METEOR (a ~10 s Java start)")
    p.add_argument("--output", help="report JSON (default eval_<task>.json)")
    p.add_argument("--update-card", action="store_true", help="record the metrics in the export's README.md")
    p.set_defaults(func=model_command(lazy("mmgpt.eval.benchmark:run", "BenchmarkConfig")))
