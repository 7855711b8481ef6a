"""What every reader shares: the record error, the read result, and JSON access with locations.

A reader turns one file in its dataset's original format into Conversations. A bad record never
stops the file: it becomes a RecordError (file, record location, field, reason) that the mixture
either raises (on_error="raise") or counts and skips (on_error="skip").
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mmgpt.data.conversation import Conversation

# Reasons, used as keys of the report's `dropped` map.
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"


class RecordError(ValueError):
    """A record that cannot become a Conversation: says where and why."""

    def __init__(self, file: Path | str, where: str, reason: str, detail: str, field: str = ""):
        self.file, self.where, self.reason, self.field = str(file), where, reason, field
        named = f" field '{field}':" if field else ""
        super().__init__(f"{file}: {where}:{named} {reason}: {detail}")


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)

    @property
    def records(self) -> int:
        """Records seen in the file, good or bad."""
        return len(self.conversations) + len(self.errors)


def load_json(path: Path) -> Any:
    """Parse a whole JSON file; a syntax error becomes a RecordError naming line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise RecordError(path, f"line {err.lineno} column {err.colno}", MALFORMED_JSON, err.msg)
    except UnicodeDecodeError as err:
        raise RecordError(path, f"byte {err.start}", MALFORMED_JSON, "not UTF-8")


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed object or RecordError) per non-blank line of a JSON-lines file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, RecordError(path, where, MALFORMED_JSON, f"not UTF-8 at byte {err.start}")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, RecordError(path, where, MALFORMED_JSON, err.msg)


def expect_list(path: Path, data: Any, what: str = "a JSON list of records") -> list:
    if not isinstance(data, list):
        raise RecordError(path, "top level", BAD_FIELD, f"expected {what}, got {type(data).__name__}")
    return data


def get(
    rec: Any, key: str, types: type | tuple[type, ...], path: Path, where: str, default: Any = ...
) -> Any:
    """rec[key] checked against `types`; missing (without default) or mistyped -> RecordError."""
    if not isinstance(rec, dict):
        raise RecordError(path, where, BAD_FIELD, f"record is {type(rec).__name__}, not an object")
    if key not in rec or rec[key] is None:
        if default is ...:
            raise RecordError(path, where, MISSING_FIELD, "required", field=key)
        return default
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise RecordError(path, where, BAD_FIELD, f"expected {names}, got {type(value).__name__}", key)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_records(
    records: Iterator[tuple[str, Any]], convert: Callable[[Any, str], Conversation]
) -> ReadResult:
    """Apply `convert(record, location)` record by record, collecting errors instead of raising."""
    result = ReadResult()
    for where, rec in records:
        if isinstance(rec, RecordError):
            result.errors.append(rec)
            continue
        try:
            conv = convert(rec, where)
        except RecordError as err:
            result.errors.append(err)
            continue
        result.conversations.append(conv)
    return result


def indexed(records: list) -> Iterator[tuple[str, Any]]:
    """(location, record) for a JSON list: locations are 0-based record indices."""
    return ((f"record {i}", rec) for i, rec in enumerate(records))
