"""Users' own data: JSON lines of {image?: str | [str], conversations: [...]} in the LLaVA shape.

Language-only records simply omit `image`. Several images each get an `### Image:` block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation
from mmgpt.data.sources.base import ReadResult, iter_jsonl, read_records
from mmgpt.data.sources.llava import to_conversation


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    def convert(rec: Any, where: str) -> Conversation:
        return to_conversation(rec, path, where, source=source, image_required=False)

    return read_records(path, iter_jsonl(path), convert)
