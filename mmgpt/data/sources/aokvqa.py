"""A-OKVQA (`aokvqa_v1p0_{split}.json`): a JSON list of multiple-choice questions on COCO 2017.

Image: `{split}2017/{image_id:012d}.jpg` under the COCO image root (the record's `split`, else
the file's). Response: "The answer is {choice}. Because {rationales joined by a space}".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmgpt.data.conversation import Conversation, Round
from mmgpt.data.sources.base import (BAD_FIELD, EMPTY_INSTRUCTION, ReadResult, RecordError,
                                     expect_list, get, indexed, load_json, read_records)


def read(path: Path, *, source: str, seed: int, split: str = "train") -> ReadResult:
    def convert(rec: Any, where: str) -> Conversation:
        choices = get(rec, "choices", list, path, where)
        idx = get(rec, "correct_choice_idx", int, path, where)
        rationales = get(rec, "rationales", list, path, where)
        image_id = get(rec, "image_id", int, path, where)
        question = get(rec, "question", str, path, where)
        if not question.strip():  # would train an answer to no question
            raise RecordError(path, where, EMPTY_INSTRUCTION, "empty question", "question")
        if not 0 <= idx < len(choices) or not isinstance(choices[idx], str):
            raise RecordError(path, where, BAD_FIELD, f"no string choice at {idx}", "correct_choice_idx")
        if not all(isinstance(r, str) for r in rationales):
            raise RecordError(path, where, BAD_FIELD, "rationales must be strings", "rationales")
        response = f"The answer is {choices[idx]}. Because {' '.join(r.strip() for r in rationales)}"
        record_split = get(rec, "split", str, path, where, default=split)
        return Conversation(
            rounds=[Round(question, response)],
            images=[f"{record_split}2017/{image_id:012d}.jpg"],
            source=source,
            origin=f"{path.name} {where} question_id {rec.get('question_id', '?')}",
        )

    return read_records(path, indexed(expect_list(path, load_json(path))), convert)
