"""LLaVA-Instruct-150K files (detail_23k, complex_reasoning_77k, conversation_58k).

A JSON list of {id, image, conversations: [{from: human|gpt, value}]}. The first human turn
carries an `<image>` marker at its start or end (with a newline): markers are stripped, because
the template places the image (the original code strips them too). A record whose human turns
hold a different number of markers than it has images is dropped (`image_count_mismatch`) rather
than silently altered. Every human->gpt pair becomes one round, in file order.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import (BAD_FIELD, IMAGE_COUNT_MISMATCH, ReadResult, RecordError,
                                     expect_list, get, indexed, load_json, read_records)
from mmgpt.contracts import IMAGE

_MARKER = re.compile(rf"\s*{re.escape(IMAGE)}\s*")  # a marker and the whitespace around it
HUMAN = ("human", "user")
ASSISTANT = ("gpt", "assistant")


def strip_image_markers(text: str) -> str:
    """Remove every `<image>` marker (one space stays where a marker sat mid-text)."""
    return _MARKER.sub(" ", text).strip()


def parse_turns(turns: Any, path: Path, where: str) -> list[Round]:
    """LLaVA `conversations` -> rounds: strictly alternating human, gpt, human, gpt, ..."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(path, where, BAD_FIELD, "expected a non-empty list", "conversations")
    rounds: list[Round] = []
    for t, turn in enumerate(turns):
        at = f"{where} turn {t}"
        speaker = get(turn, "from", str, path, at).lower()
        value = get(turn, "value", str, path, at)
        expected = HUMAN if t % 2 == 0 else ASSISTANT
        if speaker not in expected:
            raise RecordError(path, at, BAD_FIELD, f"expected {expected[0]}, got {speaker!r}", "from")
        if t % 2 == 0:
            question = strip_image_markers(value)
        else:
            rounds.append(Round(instruction=question, response=value))
    if len(turns) % 2:
        raise RecordError(path, where, BAD_FIELD, "last human turn has no gpt answer", "conversations")
    return rounds


def image_list(rec: Any, path: Path, where: str, required: bool) -> list[str]:
    """`image` as one path or a list of paths (the generic format allows several)."""
    if required:
        value = get(rec, "image", (str, list), path, where)
    else:
        value = get(rec, "image", (str, list), path, where, default=[])
    images = [value] if isinstance(value, str) else value
    if not all(isinstance(x, str) for x in images):
        raise RecordError(path, where, BAD_FIELD, "image paths must be strings", "image")
    return images


def to_conversation(rec: Any, path: Path, where: str, *, source: str,
                    image_required: bool) -> Conversation:
    """One LLaVA-shaped record ({image?, conversations}) as a Conversation."""
    ident = f" id {rec['id']}" if isinstance(rec, dict) and "id" in rec else ""
    turns = get(rec, "conversations", list, path, where)
    rounds = parse_turns(turns, path, where)  # validates every turn first
    images = image_list(rec, path, where, required=image_required)
    markers = sum(turn["value"].count(IMAGE) for turn in turns[::2])
    if markers != len(images):
        raise RecordError(path, where, IMAGE_COUNT_MISMATCH,
                          f"{markers} {IMAGE} markers in the human turns for {len(images)} images",
                          "conversations")
    return Conversation(
        rounds=rounds,
        images=images,
        source=source,
        origin=f"{path.name} {where}{ident}",
    )


def read(path: Path, *, source: str, seed: int) -> ReadResult:
    def convert(rec: Any, where: str) -> Conversation:
        return to_conversation(rec, path, where, source=source, image_required=True)

    return read_records(path, indexed(expect_list(path, load_json(path))), convert)
