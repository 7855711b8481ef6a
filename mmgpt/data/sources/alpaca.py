"""Alpaca-GPT4 (`alpaca_gpt4_data.json`): a JSON list of {instruction, input, output}."""
from __future__ import annotations

from pathlib import Path

from mmgpt.data.sources.base import (ReadResult, expect_list, indexed, instruction_conversation, load_json,
                                     read_records)


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    return read_records(path, indexed(expect_list(path, load_json(path))), lambda rec, where: instruction_conversation(
        rec, path, where, source=source, input_field="input", response_field="output"))
