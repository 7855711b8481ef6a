"""Baize (`quora_chat_data.json` etc.): a JSON list of {topic, input} language-only dialogues.

`input` starts with "The conversation between human and AI assistant.\n", then turns separated by
"\n" and prefixed "[|Human|] " / "[|AI|] ", ending with an empty "[|Human|] " turn (dropped).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import (BAD_FIELD, ReadResult, RecordError, expect_list, get,
                                     indexed, load_json, read_records)

_TURN = re.compile(r"(?:^|\n)\[\|(Human|AI)\|\] ?")


def parse_dialogue(text: str, path: Path, where: str) -> list[Round]:
    """Split on the speaker tags (turns may hold newlines) and pair Human -> AI in order."""
    pieces = _TURN.split(text)  # [preamble, speaker, text, speaker, text, ...]
    turns = list(zip(pieces[1::2], pieces[2::2]))
    if turns and turns[-1][0] == "Human" and not turns[-1][1].strip():
        turns.pop()
    rounds = []
    for i in range(0, len(turns), 2):
        pair = turns[i : i + 2]
        if [s for s, _ in pair] != ["Human", "AI"]:
            raise RecordError(path, where, BAD_FIELD, f"turn {i}: expected [|Human|] then [|AI|]", "input")
        rounds.append(Round(instruction=pair[0][1], response=pair[1][1]))
    if not rounds:
        raise RecordError(path, where, BAD_FIELD, "no [|Human|]/[|AI|] turns", "input")
    return rounds


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    def convert(rec: Any, where: str) -> Conversation:
        rounds = parse_dialogue(get(rec, "input", str, path, where), path, where)
        return Conversation(rounds=rounds, source=source, origin=f"{path.name} {where}")

    return read_records(path, indexed(expect_list(path, load_json(path))), convert)
