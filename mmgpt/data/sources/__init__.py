"""One reader per dataset, each reading the dataset's original on-disk format.

`READERS[type](path, source=name, seed=seed, **options) -> ReadResult`.
"""
from __future__ import annotations

from typing import Callable

from mmgpt.data.sources import alpaca, aokvqa, baize, coco, dolly, generic, llava, minigpt4, ocrvqa
from mmgpt.data.sources.base import ReadResult, RecordError

READERS: dict[str, Callable[..., ReadResult]] = {
    "dolly": dolly.read,
    "alpaca": alpaca.read,
    "baize": baize.read,
    "llava": llava.read,
    "minigpt4": minigpt4.read,
    "aokvqa": aokvqa.read,
    "coco_caption": coco.read,
    "ocrvqa": ocrvqa.read,
    "generic": generic.read,
}

__all__ = ["READERS", "ReadResult", "RecordError"]
