"""COCO Caption in either public layout, detected from the file's top level.

- Karpathy / LAVIS list: [{image, caption: str | [str], image_id}], `image` relative to the COCO
  image root (e.g. `val2014/COCO_val2014_000000522418.jpg`).
- Original COCO `captions_*.json`: {images: [{id, file_name}], annotations: [{image_id, caption}]};
  one conversation per image, `file_name` relative to the image root (point it at `train2017/`).
A record with several captions uses one, drawn with the seeded RNG; the instruction is a paper
Table 3 caption instruction.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import (
    BAD_FIELD,
    MISSING_FIELD,
    RecordError,
    ReadResult,
    get,
    indexed,
    load_json,
    read_records,
)
from mmgpt.data.templates import caption_instruction


def _caption_conversation(
    rng: random.Random, captions: list, image: str, source: str, origin: str, path: Path, where: str
) -> Conversation:
    if not captions or not all(isinstance(c, str) for c in captions):
        raise RecordError(path, where, BAD_FIELD, "expected caption strings", "caption")
    instruction = caption_instruction(rng)
    rnd = Round(instruction=instruction, response=rng.choice(captions))
    return Conversation(rounds=[rnd], images=[image], source=source, origin=origin)


def _read_karpathy(path: Path, records: list, rng: random.Random, source: str) -> ReadResult:
    def convert(rec: Any, where: str) -> Conversation:
        caption = get(rec, "caption", (str, list), path, where)
        captions = [caption] if isinstance(caption, str) else caption
        image = get(rec, "image", str, path, where)
        return _caption_conversation(rng, captions, image, source, f"{path.name} {where}", path, where)

    return read_records(path, indexed(records), convert)


def _read_original(path: Path, data: dict, rng: random.Random, source: str) -> ReadResult:
    images = get(data, "images", list, path, "top level")
    annotations = get(data, "annotations", list, path, "top level")
    result = ReadResult()
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(annotations):
        try:
            image_id = get(ann, "image_id", int, path, f"annotations[{i}]")
            captions.setdefault(image_id, []).append(get(ann, "caption", str, path, f"annotations[{i}]"))
        except RecordError as err:
            result.errors.append(err)

    def convert(rec: Any, where: str) -> Conversation:
        image_id = get(rec, "id", int, path, where)
        file_name = get(rec, "file_name", str, path, where)
        if image_id not in captions:
            raise RecordError(path, where, MISSING_FIELD, f"image {image_id} has no caption", "annotations")
        origin = f"{path.name} images {where} id {image_id}"
        return _caption_conversation(rng, captions[image_id], file_name, source, origin, path, where)

    images_result = read_records(path, indexed(images), convert)
    result.conversations = images_result.conversations
    result.errors += images_result.errors
    return result


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    data = load_json(path)
    rng = random.Random(f"{seed}:{source}")
    if isinstance(data, list):
        return _read_karpathy(path, data, rng, source)
    if isinstance(data, dict) and "annotations" in data:
        return _read_original(path, data, rng, source)
    raise RecordError(path, "top level", BAD_FIELD, "neither a Karpathy list nor COCO captions json")
