"""OCR-VQA `dataset.json`: {id: {imageURL, questions, answers, title, ..., split}}.

The image file is the id plus the extension of `imageURL` (e.g. `761183272.jpg`) in the images
folder. pairs="all" (default) makes every Q/A pair a round of one dialogue; pairs="one" keeps one
pair drawn with the seeded RNG (the released MultiModal-GPT behaviour).
"""
from __future__ import annotations

import random
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import BAD_FIELD, RecordError, ReadResult, get, load_json, read_records


def read(path: Path, *, source: str, seed: int, pairs: str = "all") -> ReadResult:
    if pairs not in ("all", "one"):
        raise ValueError(f"ocrvqa option pairs must be 'all' or 'one', got {pairs!r}")
    data = load_json(path)
    if not isinstance(data, dict):
        raise RecordError(path, "top level", BAD_FIELD, "expected an object keyed by id")
    rng = random.Random(f"{seed}:{source}")

    def convert(item: tuple[str, Any], where: str) -> Conversation:
        key, rec = item
        questions = get(rec, "questions", list, path, where)
        answers = get(rec, "answers", list, path, where)
        if len(questions) != len(answers) or not questions:
            raise RecordError(path, where, BAD_FIELD, "questions/answers lengths differ or empty", "answers")
        if not all(isinstance(x, str) for x in questions + answers):
            raise RecordError(path, where, BAD_FIELD, "questions/answers must be strings", "questions")
        suffix = PurePosixPath(urlparse(get(rec, "imageURL", str, path, where)).path).suffix or ".jpg"
        rounds = [Round(q, a) for q, a in zip(questions, answers)]
        if pairs == "one":
            rounds = [rng.choice(rounds)]
        return Conversation(
            rounds=rounds, images=[key + suffix], source=source, origin=f"{path.name} {where}"
        )

    return read_records(path, ((f"key {k!r}", (k, v)) for k, v in data.items()), convert)
