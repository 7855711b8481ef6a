"""databricks-dolly-15k: JSON lines of {instruction, context, response, category}; context -> Input."""
from __future__ import annotations

from pathlib import Path

from mmgpt.data.sources.base import ReadResult, instruction_conversation, iter_jsonl, read_records


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    return read_records(path, iter_jsonl(path), lambda rec, where: instruction_conversation(
        rec, path, where, source=source, input_field="context", response_field="response"))
