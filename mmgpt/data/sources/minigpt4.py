"""MiniGPT-4 `cc_sbu_align/filter_cap.json`: {"annotations": [{image_id, caption}]}.

The image is `image/{image_id}.jpg` under the cc_sbu_align folder; the instruction is a paper
Table 3 caption instruction drawn with a seeded RNG.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import ReadResult, get, indexed, load_json, read_records
from mmgpt.data.templates import caption_instruction


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    rng = random.Random(f"{seed}:{source}")
    annotations = get(load_json(path), "annotations", list, path, "top level")

    def convert(rec: Any, where: str) -> Conversation:
        image_id = get(rec, "image_id", (str, int), path, where)
        return Conversation(
            rounds=[Round(caption_instruction(rng), get(rec, "caption", str, path, where))],
            images=[f"image/{image_id}.jpg"],
            source=source,
            origin=f"{path.name} annotations {where} image_id {image_id}",
        )

    return read_records(path, indexed(annotations), convert)
