"""databricks-dolly-15k: JSON lines of {instruction, context, response, category}; context -> Input."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import ReadResult, get, iter_jsonl, read_records


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    def convert(rec: Any, where: str) -> Conversation:
        rnd = Round(
            instruction=get(rec, "instruction", str, path, where),
            input=get(rec, "context", str, path, where, default=""),
            response=get(rec, "response", str, path, where),
        )
        return Conversation(rounds=[rnd], source=source, origin=f"{path.name} {where}")

    return read_records(path, iter_jsonl(path), convert)
