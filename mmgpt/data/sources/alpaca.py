"""Alpaca-GPT4 (`alpaca_gpt4_data.json`): a JSON list of {instruction, input, output}."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import ReadResult, expect_list, get, indexed, load_json, read_records


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    def convert(rec: Any, where: str) -> Conversation:
        rnd = Round(
            instruction=get(rec, "instruction", str, path, where),
            input=get(rec, "input", str, path, where, default=""),
            response=get(rec, "output", str, path, where),
        )
        return Conversation(rounds=[rnd], source=source, origin=f"{path.name} {where}")

    return read_records(path, indexed(expect_list(path, load_json(path))), convert)
