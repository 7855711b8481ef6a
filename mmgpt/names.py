"""Names the parsers offer as choices, importable without torch (`mmgpt --help` must not import the
model stack). The library tables keyed by them refuse to import if they ever differ: one source each.
The model presets' names live in mmgpt/models/preset_names.py, for the same reason.
"""
from __future__ import annotations

DTYPE_NAMES: tuple[str, ...] = ("bf16", "fp16", "fp32")  # mmgpt.inference.model_dir.DTYPES
TASK_NAMES: tuple[str, ...] = ("aokvqa", "coco_caption", "llava", "ocrvqa", "vqa")  # mmgpt.eval.benchmark.TASKS
