"""What every reader shares: the record error, the read result, and JSON access with locations.

A reader turns one file in its dataset's original format into Conversations. A bad record never
stops the file: it becomes a RecordError (file, record location, field, reason) that the mixture
either raises (on_error="raise") or counts and skips (on_error="skip"). A RecordError escaping a
reader means the whole file is unusable (it does not parse, or its top level has the wrong shape).

Records are untrusted: valid JSON can still hold what Python will not convert (integers past
`sys.get_int_max_str_digits()`, nesting past the parser's recursion limit, lone surrogates such
as "\\ud800"). Each of these fails its own record, never the reader.
"""
from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mmgpt.data.conversation import Conversation, Round

# Reasons, used as keys of the report's `dropped` map.
MALFORMED_JSON = "malformed_json"
NESTING_TOO_DEEP = "nesting_too_deep"
NUMBER_TOO_LONG = "number_too_long"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
EMPTY_INSTRUCTION = "empty_instruction"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
READER_ERROR = "reader_error"


def printable(text: str) -> str:
    """`text` with lone surrogates escaped: messages and origins must survive print and logging."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


@dataclass(frozen=True)
class LongInteger:
    """A JSON integer with more digits than `int()` accepts, standing in for its value so that only
    a record that needs it fails (`get` refuses it), not the whole file."""

    digits: int


def _parse_int(text: str) -> int | LongInteger:
    try:
        return int(text)
    except ValueError:  # the JSON grammar guarantees digits: this is the int-string limit
        return LongInteger(len(text))


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=_parse_int)


def _line_col(text: str | bytes, offset: int) -> str:
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, offset) + 1
    return f"line {line} column {offset - text.rfind(newline, 0, offset)}"


_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _deepest(text: str) -> tuple[int, int]:
    """(depth, offset) of the deepest nesting: depth, and where the top-level element holding it
    starts (the record of a JSON list). The parser's RecursionError gives no position; only run
    on that failure."""
    opened: list[int] = []  # offsets of the brackets open at this point
    best = at = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in "[{":
            opened.append(match.start())
            if len(opened) > best:
                best, at = len(opened), opened[min(1, len(opened) - 1)]
        elif token in "]}" and opened:
            opened.pop()
    return best, at


def load_json(path: Path) -> Any:
    """Parse a whole JSON file (a UTF-8 BOM is allowed). One document cannot be split into
    records, so any failure is a RecordError naming line and column: the file is unusable."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:  # its offset counts from after the BOM
        raise RecordError(path, _line_col(raw, bom + err.start), MALFORMED_JSON,
                          f"not UTF-8 ({err.reason})") from None
    try:
        return _loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(path, f"line {err.lineno} column {err.colno}", MALFORMED_JSON, err.msg) from None
    except RecursionError:
        depth, offset = _deepest(text)
        raise RecordError(path, _line_col(text, offset), NESTING_TOO_DEEP,
                          f"the element starting here nests {depth} levels deep, past Python's json parser "
                          "(recursive)") from None


def _parse_line(path: Path, where: str, raw: bytes) -> Any:
    """One JSON-lines record, or the RecordError saying why it is not one (None: blank line)."""
    try:
        line = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return RecordError(path, where, MALFORMED_JSON, f"not UTF-8 at byte {err.start}")
    if not line.strip():
        return None
    try:
        return _loads(line)
    except json.JSONDecodeError as err:
        return RecordError(path, where, MALFORMED_JSON, err.msg)
    except RecursionError:
        return RecordError(path, where, NESTING_TOO_DEEP, "nested deeper than Python's json parser recurses")


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed object or RecordError) per non-blank line of a JSON-lines file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            rec = _parse_line(path, where, raw)
            if rec is not None:
                yield where, rec


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
    if isinstance(value, LongInteger):
        raise RecordError(path, where, NUMBER_TOO_LONG, f"an integer of {value.digits} digits", key)
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise RecordError(path, where, BAD_FIELD, f"expected {names}, got {type(value).__name__}", key)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_records(
    path: Path, records: Iterator[tuple[str, Any]], convert: Callable[[Any, str], Conversation]
) -> ReadResult:
    """Apply `convert(record, location)` record by record, collecting errors instead of raising.

    Any exception converting one record fails that record only (`reader_error`, with its type):
    records are untrusted, and one the reader did not foresee must not stop a run.
    """
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
        except Exception as err:  # noqa: BLE001 - see the docstring
            detail = printable(f"{type(err).__name__}: {err}")
            result.errors.append(RecordError(path, where, READER_ERROR, detail))
            continue
        conv.origin = printable(conv.origin)
        result.conversations.append(conv)
    return result


def indexed(records: list) -> Iterator[tuple[str, Any]]:
    """(location, record) for a JSON list: locations are 0-based record indices."""
    return ((f"record {i}", rec) for i, rec in enumerate(records))


def instruction_conversation(rec: Any, path: Path, where: str, *, source: str, input_field: str,
                             response_field: str) -> Conversation:
    """One {instruction, <input_field>?, <response_field>} record (Dolly, Alpaca) as one round."""
    rnd = Round(
        instruction=get(rec, "instruction", str, path, where),
        input=get(rec, input_field, str, path, where, default=""),
        response=get(rec, response_field, str, path, where),
    )
    return Conversation(rounds=[rnd], source=source, origin=f"{path.name} {where}")
