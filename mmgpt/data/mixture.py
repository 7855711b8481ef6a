"""The training data of one epoch: sources, per-source sampling, language:VL ratio, seeded order.

Construction parses every source file and drops every record that can be judged without decoding
or tokenising (parse errors, missing fields, no rounds / empty response, text that is not valid
Unicode, more images than a packed row takes, image path outside the root or unusable, missing
image file), so `sample:` and the language:VL ratio count usable records only and adding bad
records to a source does not change which good ones are kept. It then fixes the epoch order from
the seed alone, so every process that builds the same config gets the same order; exact resume is
a start index. Tokenisation and image decoding happen lazily in `load(i)`. Bad records never stop
a run under on_error="skip": they are counted per source and reason in `report`. A source FILE
that does not parse at all always stops construction (DataError): training without one of its
sources, silently, is worse than not starting.

A validation split (`holdout`, per source) is taken out of the usable records BEFORE sampling: a
record is held out when a seeded hash of its identity (source name, origin) ranks among the
source's lowest, so the same records are held out whatever `sample:`, the ratio, the world size or
a resume select, and none of them is ever in the epoch. `holdout()` serves them as an epoch of their own.
"""
from __future__ import annotations

import copy
import hashlib
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from inspect import signature
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from mmgpt.configfile import ConfigError, from_dict, read_mapping
from mmgpt.contracts import TokenizedSample
from mmgpt.data.conversation import EMPTY_RESPONSE, NO_ROUNDS, Conversation, tokenize
from mmgpt.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_TOO_LARGE, find_image, load_image
from mmgpt.data.sources import READERS, RecordError
from mmgpt.data.sources.base import MALFORMED_JSON, printable
from mmgpt.image_transform import clip_transform

ON_ERROR = ("skip", "raise")
CLIP_IMAGE_SIZE = 224  # ViT-L/14's input side: the image size when neither model nor mixture says
MAX_ERROR_EXAMPLES = 10

# Drop reasons of the mixture itself (the readers', images' and tokenize's are theirs).
BAD_TEXT = "bad_text"
TOO_MANY_IMAGES = "too_many_images"


@dataclass
class SourceConfig:
    """One dataset file. `sample`: usable records drawn (seeded, without replacement); None/"all" = all.

    `options` go to the reader (e.g. ocrvqa `pairs: one`, aokvqa `split: val`).
    """

    name: str
    type: str
    path: str
    image_root: str | None = None
    sample: int | str | None = None  # a count, or "all"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sample == "all":
            self.sample = None
        if self.type not in READERS:
            raise ValueError(f"source {self.name!r}: unknown type {self.type!r} (known: {sorted(READERS)})")
        try:
            signature(READERS[self.type]).bind(Path(self.path), source=self.name, seed=0, **self.options)
        except TypeError as err:
            raise ValueError(f"source {self.name!r}: bad options {self.options} for {self.type}: {err}") from None
        if self.sample is not None and (not isinstance(self.sample, int) or self.sample < 0):
            raise ValueError(f"source {self.name!r}: sample must be a count >= 0 or 'all', "
                             f"got {self.sample!r}")


@dataclass
class MixtureConfig:
    """The data section of a run.

    language_vl_ratio: language-only : vision-language samples (the paper's 1:1 by default; the
    larger side is subsampled; None keeps the sampled counts). on_error="raise" turns record
    errors into exceptions: malformed JSON, missing fields, bad text, unusable image paths and
    missing images when the mixture is built, corrupt or too large images when loaded; content
    drops (empty response, too long, too many images) are always counted, never raised.
    max_image_pixels: images whose header says more pixels are refused before decoding
    (`image_too_large`); None leaves only PIL's own bomb limit.
    """

    sources: list[SourceConfig]
    seed: int = 42
    max_length: int = 2048
    language_vl_ratio: float | None = 1.0
    on_error: str = "skip"
    image_size: int | None = None  # CLIP input side; None: the model's (training refuses another)
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.max_image_pixels is not None and (not isinstance(self.max_image_pixels, int)
                                                  or self.max_image_pixels < 1):
            raise ValueError(f"max_image_pixels must be a count >= 1 or null, got {self.max_image_pixels!r}")
        if self.max_length < 1 or (self.image_size is not None and self.image_size < 1):
            raise ValueError(f"max_length and image_size must be >= 1, got {self.max_length}, {self.image_size}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.language_vl_ratio is not None and self.language_vl_ratio <= 0:
            raise ValueError(f"language_vl_ratio must be > 0 or null, got {self.language_vl_ratio}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None,
                  where: str = "mixture") -> "MixtureConfig":
        """Build from parsed YAML/JSON (typed: unknown keys and wrong types name the key); relative
        source paths are resolved against `base_dir`."""
        data = dict(data)
        sources = data.get("sources")
        if isinstance(sources, list) and base_dir is not None:
            data["sources"] = [{**src, **{key: str((base_dir / src[key]).resolve()) for key in ("path", "image_root")
                                          if isinstance(src.get(key), str)}} if isinstance(src, dict) else src
                               for src in sources]
        if not data.get("sources"):
            raise ConfigError(f"{where}: a mixture needs at least one source (`sources:`)")
        return from_dict(cls, data, where)

    @classmethod
    def load(cls, path: str | Path) -> "MixtureConfig":
        """Read a YAML or JSON file (JSON is YAML), resolving paths against its folder."""
        path = Path(path)
        return cls.from_dict(read_mapping(path), base_dir=path.resolve().parent, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SourceReport:
    """Per source: `read` records seen in the file (good or bad); `usable` conversations that passed
    every check made at construction (what the holdout, `sample:` and the ratio choose from; a
    reader may make several conversations of one record); `held_out` usable records taken out
    for validation (never trained on); `selected` usable records in the epoch (after the holdout,
    sampling and the ratio); `kept` selected samples that loaded fine; `dropped` by
    reason, each record once: at construction, before sampling, whatever needs no decoding or
    tokenising (parse, fields, empty response, image path, missing image; the same in every
    process that builds the mixture), else at its first load (corrupt image, too long, ...)."""

    read: int = 0
    usable: int = 0
    held_out: int = 0
    selected: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_at_load: Counter = field(default_factory=Counter)  # the part of `dropped` found by load()
    errors: list[str] = field(default_factory=list)  # first messages, for the humans

    def drop(self, reason: str, message: str = "", at_load: bool = False) -> None:
        self.dropped[reason] += 1
        if at_load:
            self.dropped_at_load[reason] += 1
        if message and len(self.errors) < MAX_ERROR_EXAMPLES:
            self.errors.append(printable(message))


@dataclass
class DataReport:
    sources: dict[str, SourceReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": {
                name: {
                    "read": r.read,
                    "usable": r.usable,
                    "held_out": r.held_out,
                    "selected": r.selected,
                    "kept": r.kept,
                    "dropped": dict(sorted(r.dropped.items())),
                    "dropped_at_load": dict(sorted(r.dropped_at_load.items())),
                    "errors": list(r.errors),
                }
                for name, r in self.sources.items()
            }
        }


def _content_drop(conv: Conversation) -> str | None:
    """The drops of `tokenize` that need no tokeniser: same conditions, same reasons."""
    if not conv.rounds:
        return NO_ROUNDS
    if any(not r.response.strip() for r in conv.rounds):
        return EMPTY_RESPONSE
    return None


def _valid_unicode(conv: Conversation) -> bool:
    """False for text with lone surrogates ("\\ud800" is valid JSON): no tokenizer takes it."""
    try:
        for r in conv.rounds:
            (r.instruction + r.input + r.response).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class DataError(RuntimeError):
    """A bad record under on_error="raise", or a source file that does not parse at all."""


class Mixture:
    """The epoch: `len(self)` sample references in a fixed seeded order, loaded by `load(i)`.

    `max_images`: the packer's max_images_per_row (None: no limit); a record with more images could
    never be packed, so it is dropped here (`too_many_images`) instead of stopping training.
    `holdout`: per source, a count of usable records or a fraction of them (at least one) held out
    for validation (`holdout()`); None holds out nothing.
    """

    def __init__(
        self, cfg: MixtureConfig, tokenizer: PreTrainedTokenizerBase, image_size: int | None = None,
        max_images: int | None = None, holdout: int | float | None = None,
    ):
        if image_size is not None and cfg.image_size is not None and image_size != cfg.image_size:
            raise ConfigError(f"mixture image_size {cfg.image_size} differs from the model's CLIP input "
                              f"size {image_size}: remove it from the mixture (or set it to {image_size})")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_images = max_images
        self.transform = clip_transform(image_size or cfg.image_size or CLIP_IMAGE_SIZE)
        self.report = DataReport()
        self._conversations: list[list[Conversation]] = []
        self._loaded: set[int] = set()
        self._held_out: list[tuple[int, int]] = []
        selected: list[tuple[int, int]] = []
        for s, src in enumerate(cfg.sources):
            convs = self._usable(src, self._read(src))
            self._conversations.append(convs)
            self.report.sources[src.name].usable = len(convs)
            held = self._hold_out(src, convs, holdout)
            self.report.sources[src.name].held_out = len(held)
            self._held_out += [(s, c) for c in sorted(held)]
            train = [c for c in range(len(convs)) if c not in held]
            selected += [(s, train[j]) for j in self._sample(src, len(train))]
        selected = self._balance(selected)
        for s, _ in selected:
            self.report.sources[cfg.sources[s].name].selected += 1
        random.Random(f"{cfg.seed}:order").shuffle(selected)
        self._order = selected

    def _read(self, src: SourceConfig) -> list[Conversation]:
        report = self.report.sources.setdefault(src.name, SourceReport())
        path = Path(src.path)
        if not path.is_file():
            raise FileNotFoundError(f"source {src.name!r}: file not found: {path}")
        try:
            result = READERS[src.type](path, source=src.name, seed=self.cfg.seed, **src.options)
        except RecordError as err:  # the whole file is unusable (e.g. a broken JSON list)
            raise DataError(f"source {src.name!r}: {err}") from None
        if not result.conversations and result.errors and all(e.reason == MALFORMED_JSON
                                                              for e in result.errors):
            raise DataError(f"source {src.name!r}: no record parses, e.g. {result.errors[0]}")
        if result.errors and self.cfg.on_error == "raise":
            raise result.errors[0]
        report.read += result.records
        for err in result.errors:
            report.drop(err.reason, str(err))
        return result.conversations

    def _usable(self, src: SourceConfig, convs: list[Conversation]) -> list[Conversation]:
        """The records that pass every check needing no decoding or tokenising; the others are
        counted here, once, so that sampling and the ratio only ever see records that can train."""
        if src.image_root is None and any(conv.images for conv in convs):
            raise ValueError(f"source {src.name!r}: records have images but no image_root is set")
        report = self.report.sources[src.name]
        usable = []
        for conv in convs:
            problem = self._screen(src, conv)
            if problem is None:
                usable.append(conv)
            else:
                report.drop(*problem)
        return usable

    def _screen(self, src: SourceConfig, conv: Conversation) -> tuple[str, str] | None:
        """(reason, message) when `conv` is unusable, judged without opening its images."""
        reason = _content_drop(conv)
        if reason is not None:
            return reason, f"{conv.origin}: {reason}"
        if not _valid_unicode(conv):
            return BAD_TEXT, self._error(f"{conv.origin}: {BAD_TEXT}: lone surrogate (not valid Unicode)")
        if self.max_images is not None and len(conv.images) > self.max_images:
            return TOO_MANY_IMAGES, (f"{conv.origin}: {TOO_MANY_IMAGES}: {len(conv.images)} images > "
                                     f"max_images_per_row={self.max_images}")
        for rel in conv.images:
            found = find_image(Path(src.image_root), rel)
            if isinstance(found, str):
                return found, self._image_error(src, conv, rel, found)
        return None

    def _error(self, message: str) -> str:
        """The message of a bad record; raised as DataError instead under on_error="raise"."""
        if self.cfg.on_error == "raise":
            raise DataError(message)
        return message

    def _image_error(self, src: SourceConfig, conv: Conversation, rel: str, reason: str) -> str:
        """The message for an unusable image (naming the cap that refused it, if one did)."""
        cap = f" > max_image_pixels={self.cfg.max_image_pixels}" if reason == IMAGE_TOO_LARGE else ""
        return self._error(f"{conv.origin}: image {rel!r} under {src.image_root}: {reason}{cap}")

    def _hold_out(self, src: SourceConfig, convs: list[Conversation], holdout: int | float | None) -> set[int]:
        """Indices into the usable `convs` of the held-out records: the lowest seeded hashes of
        (source, origin, occurrence of that origin), so membership depends on the seed and the
        usable records alone, never on `sample:`, the ratio or the world size."""
        if holdout is None or not convs:
            return set()
        count = holdout if isinstance(holdout, int) else max(1, round(holdout * len(convs)))
        seen: Counter = Counter()
        keys = []
        for c, conv in enumerate(convs):
            seen[conv.origin] += 1
            identity = f"{self.cfg.seed}:holdout:{src.name}:{conv.origin}:{seen[conv.origin]}"
            keys.append((hashlib.blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=8).digest(), c))
        return {c for _, c in sorted(keys)[:count]}

    def holdout(self) -> "Mixture":
        """The held-out records as an epoch of their own (source by source, in file order), with a
        report of their own, so that loading them never counts toward the training report."""
        view = copy.copy(self)  # shares the parsed records, tokenizer and transform
        view._order, view._held_out, view._loaded = list(self._held_out), [], set()
        view.report = DataReport({src.name: SourceReport(selected=self.report.sources[src.name].held_out)
                                  for src in self.cfg.sources})
        return view

    def _sample(self, src: SourceConfig, available: int) -> list[int]:
        if src.sample is None or src.sample >= available:
            return list(range(available))
        rng = random.Random(f"{self.cfg.seed}:sample:{src.name}")
        return sorted(rng.sample(range(available), src.sample))

    def _balance(self, refs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Subsample the larger side so language : VL = cfg.language_vl_ratio (when both exist)."""
        ratio = self.cfg.language_vl_ratio
        vl = [r for r in refs if self._conversations[r[0]][r[1]].images]
        lang = [r for r in refs if not self._conversations[r[0]][r[1]].images]
        if ratio is None or not vl or not lang:
            return refs
        rng = random.Random(f"{self.cfg.seed}:ratio")
        if len(lang) > ratio * len(vl):
            lang = sorted(rng.sample(lang, max(1, round(ratio * len(vl)))))
        else:
            vl = sorted(rng.sample(vl, max(1, round(len(lang) / ratio))))
        return sorted(lang + vl)

    def __len__(self) -> int:
        return len(self._order)

    def conversation(self, i: int) -> Conversation:
        """The record behind epoch position i (for inspection and error messages)."""
        s, c = self._order[i]
        return self._conversations[s][c]

    def load(self, i: int) -> TokenizedSample | None:
        """Sample i of the epoch (its `index` is i), or None when dropped (counted in report)."""
        src = self.cfg.sources[self._order[i][0]]
        first = i not in self._loaded
        self._loaded.add(i)
        sample = self._build(src, self.conversation(i))
        report = self.report.sources[src.name]
        if isinstance(sample, tuple):
            if first:
                report.drop(*sample, at_load=True)
            return None
        sample.index = i
        if first:
            report.kept += 1
        return sample

    def _build(self, src: SourceConfig, conv: Conversation) -> TokenizedSample | tuple[str, str]:
        """Tokenised text and decoded images of `conv`, or (reason, message) when it is dropped."""
        try:
            sample = tokenize(conv, self.tokenizer, self.cfg.max_length)
        except (TypeError, ValueError, OverflowError, RecursionError) as err:  # text the tokenizer refuses
            return BAD_TEXT, self._error(f"{conv.origin}: {BAD_TEXT}: {type(err).__name__}: {err}")
        if isinstance(sample, str):
            return sample, f"{conv.origin}: {sample}"
        for rel in conv.images:
            image = load_image(Path(src.image_root), rel, self.transform, self.cfg.max_image_pixels)
            if isinstance(image, str):
                return image, self._image_error(src, conv, rel, image)
            sample.images.append(image)
        return sample
