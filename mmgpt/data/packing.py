"""Packing tokenised samples (and their images) into fixed-capacity rows, and collating them.

Why: padded batches waste most of the compute on a mix of short captions and long LLaVA
dialogues. Concatenating several whole samples per row keeps every token real; the model keeps
samples apart with `cu_seqlens` (self-attention), per-sample `position_ids` (RoPE), labels
shifted inside each sample, and a per-token media index (cross-attention), all built here.

The packer is streaming: it holds at most `buffer_size` samples, so an epoch of any size packs in
bounded memory. Each row is seeded with the longest buffered sample and then repeatedly gets the
longest sample that still fits its remaining tokens and image budget (best fit for the gap),
paced so that rows consume images at the buffer's rate (see `Packer._take_row`).
Which samples form a row depends only on the SET of buffered samples and the seed, never on
arrival order, so the stream can be recreated exactly from `Packer.state()`, a `PackerState`
(exact resume).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from mmgpt.contracts import IGNORE_INDEX, PackedBatch, TokenizedSample
from mmgpt.media import MediaAttention, MediaLayout, attends_previous, check_media_attention, media_index, splitmix64


def _describe(sample: TokenizedSample) -> str:
    """How an error message names a sample: its epoch index and source."""
    where = f"sample index {sample.index}" if sample.index >= 0 else "ad-hoc sample"
    return f"{where} (source {sample.source or '?'!r})"


def _check_sample(sample: TokenizedSample, image_token_id: int) -> int:
    """Validate one sample's internal consistency; return its number of `<image>` tokens."""
    n = len(sample.input_ids)
    if n == 0:
        raise ValueError(f"{_describe(sample)} has no tokens")
    if len(sample.labels) != n:
        raise ValueError(f"{_describe(sample)}: {len(sample.labels)} labels for {n} input ids")
    n_image_tokens = sum(1 for t in sample.input_ids if t == image_token_id)
    if n_image_tokens != len(sample.images):
        raise ValueError(
            f"{_describe(sample)}: {n_image_tokens} <image> tokens (id {image_token_id}) "
            f"but {len(sample.images)} images"
        )
    return n_image_tokens


@dataclass
class _Columns:
    """The per-token columns of a packed batch, filled one sample at a time (collate)."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    media: list[torch.Tensor] = field(default_factory=list)
    through: list[bool] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    cu_seqlens: list[int] = field(default_factory=lambda: [0])

    def add(self, s: int, sample: TokenizedSample, image_token_id: int, attend_previous: bool) -> None:
        n = len(sample.input_ids)
        self.input_ids.extend(sample.input_ids)
        self.labels.extend(sample.labels[1:])
        self.labels.append(IGNORE_INDEX)  # the last token of a sample predicts nothing
        self.positions.extend(range(n))
        self.sample_index.extend([s] * n)
        ids = torch.tensor([sample.input_ids], dtype=torch.long)
        self.media.append(media_index(ids, image_token_id, attend_previous,
                                      image_offsets=torch.tensor([len(self.images)]))[0])
        self.through.extend([bool(sample.images)] * n)
        for image in sample.images:
            if image.shape != (self.images[0].shape if self.images else image.shape):
                raise ValueError(f"{_describe(sample)}: image shape {tuple(image.shape)} "
                                 f"differs from {tuple(self.images[0].shape)} earlier in the batch")
            self.images.append(image)
        self.cu_seqlens.append(self.cu_seqlens[-1] + n)

    def image_tensor(self, image_size: tuple[int, int] | None) -> torch.Tensor:
        if self.images:
            return torch.stack(self.images)
        h, w = image_size if image_size is not None else (0, 0)
        return torch.zeros(0, 3, h, w)


def collate(
    samples: list[TokenizedSample],
    row_tokens: int = 0,
    num_rows: int = 1,
    *,
    image_token_id: int,
    media_attention: MediaAttention = "next",
    media_seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> PackedBatch:
    """Concatenate `samples` into one PackedBatch (see mmgpt/contracts.py for the fields).

    `image_token_id` marks `<image>` tokens: the k-th one of a sample is that sample's k-th image.
    Which image each token attends follows `media_attention` (next | previous | random, see
    mmgpt/media.py; random flips a coin per sample from `media_seed` and the sample's epoch index).
    `image_size` (H, W) shapes the empty image tensor when no sample has an image; without it that
    tensor is [0, 3, 0, 0]. `row_tokens`/`num_rows` only record the capacity the samples were
    packed into (0 = unpacked).
    """
    check_media_attention(media_attention)
    if not samples:
        raise ValueError("collate needs at least one sample")
    cols = _Columns()
    for s, sample in enumerate(samples):
        _check_sample(sample, image_token_id)
        cols.add(s, sample, image_token_id, attends_previous(media_attention, media_seed, sample.index))
    media_t = torch.cat(cols.media)
    labels_t = torch.tensor(cols.labels, dtype=torch.long)
    seq_lengths = [len(s.input_ids) for s in samples]
    return PackedBatch(
        input_ids=torch.tensor(cols.input_ids, dtype=torch.long),
        labels=labels_t,
        position_ids=torch.tensor(cols.positions, dtype=torch.long),
        cu_seqlens=torch.tensor(cols.cu_seqlens, dtype=torch.int32),
        max_seqlen=max(seq_lengths),
        seqlens=tuple(seq_lengths),
        images=cols.image_tensor(image_size),
        media_index=media_t,
        media_layout=MediaLayout.build(media_t, torch.tensor(cols.through)) if cols.images else None,
        supervised_index=(labels_t != IGNORE_INDEX).nonzero().flatten(),
        sample_index=torch.tensor(cols.sample_index, dtype=torch.long),
        sources=[s.source for s in samples],
        is_vl=torch.tensor([s.is_vl for s in samples], dtype=torch.bool),
        sample_ids=[s.index for s in samples],
        num_rows=num_rows,
        row_tokens=row_tokens,
    )


def packing_efficiency(batches: Iterable[PackedBatch]) -> float:
    """Real tokens / (rows x row capacity) over several batches (1.0 = no empty room)."""
    tokens = capacity = 0
    for batch in batches:
        tokens += batch.num_tokens
        capacity += batch.num_rows * batch.row_tokens
    return tokens / capacity if capacity else 1.0


@dataclass
class PackingConfig:
    """Row capacity and packer limits; `buffer_size` bounds memory (samples held at once)."""

    max_tokens: int = 4096
    max_images_per_row: int = 32
    buffer_size: int = 512
    rows_per_batch: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_images_per_row", "buffer_size", "rows_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"PackingConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class PackerState:
    """Where a packer's input stands after a yielded batch: the next epoch position to read and
    the epoch positions of the samples still buffered. A checkpoint stores its `to_dict()`."""

    next_index: int = 0
    buffer: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index, "buffer": list(self.buffer)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PackerState":
        """Read what `to_dict` wrote (every checkpoint so far stored this form)."""
        return cls(int(data["next_index"]), tuple(int(i) for i in data["buffer"]))


# A buffered sample: (-length, tiebreak, unique order, number of images, sample). The tiebreak is
# a stateless seeded hash of the order, so a resumed packer orders its buffer exactly as the
# uninterrupted one did. The first three fields are unique, so sorting never compares samples
# and the longest sample comes first.
_Entry = tuple[int, int, int, int, TokenizedSample]


class Packer:
    """Streaming packer: samples in (epoch order), PackedBatches of `rows_per_batch` rows out.

    Exact resume: after a batch is yielded, `state()` says which samples are still buffered and
    where the input stream continues; `Packer.resume(cfg, image_token_id, state, load_fn)`
    rebuilds the buffer and `pack(stream from state.next_index)` then yields exactly the
    batches the uninterrupted packer would have yielded. `media_attention` / `media_seed` go to
    `collate` (a random-mode coin depends only on the seed and the sample's epoch index).
    """

    def __init__(
        self,
        cfg: PackingConfig,
        image_token_id: int,
        image_size: tuple[int, int] | None = None,
        media_attention: MediaAttention = "next",
        media_seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.image_size = image_size
        self.media_attention = check_media_attention(media_attention)
        self.media_seed = media_seed
        self._buffer: list[_Entry] = []
        self._buffer_tokens = 0  # totals over the buffer, for image pacing
        self._buffer_images = 0
        self._next_index = 0
        self._arrivals = 0
        self._ad_hoc = False  # a sample without an epoch index was pulled: no resumable state

    @property
    def buffered(self) -> int:
        """Number of samples held right now (never more than cfg.buffer_size)."""
        return len(self._buffer)

    def state(self) -> PackerState:
        """Where the stream stands after the last yielded batch."""
        if self._ad_hoc:
            raise ValueError("packer state needs samples with an epoch index (index >= 0)")
        return PackerState(self._next_index, tuple(sorted(e[4].index for e in self._buffer)))

    @classmethod
    def resume(
        cls,
        cfg: PackingConfig,
        image_token_id: int,
        state: PackerState,
        load_fn: Callable[[int], TokenizedSample | None],
        image_size: tuple[int, int] | None = None,
        media_attention: MediaAttention = "next",
        media_seed: int = 0,
    ) -> "Packer":
        """A packer whose buffer is `state.buffer` reloaded through `load_fn(index)`.

        Feed its `pack()` the epoch stream starting at `state.next_index`.
        """
        packer = cls(cfg, image_token_id, image_size, media_attention, media_seed)
        for index in state.buffer:
            sample = load_fn(index)
            if sample is None:
                raise ValueError(f"resume: sample index {index} was buffered but now loads as None")
            if sample.index != index:
                raise ValueError(f"resume: load_fn({index}) returned sample index {sample.index}")
            packer._admit(sample)
        packer._next_index = state.next_index
        return packer

    def pack(self, samples: Iterable[TokenizedSample]) -> Iterator[PackedBatch]:
        """Yield PackedBatches; the buffer is refilled before every row, drained at the end."""
        stream = iter(samples)
        exhausted = False
        rows: list[list[TokenizedSample]] = []
        while True:
            while not exhausted and len(self._buffer) < self.cfg.buffer_size:
                sample = next(stream, None)
                if sample is None:
                    exhausted = True
                else:
                    self._admit(sample)
            if not self._buffer:
                break
            rows.append(self._take_row())
            if len(rows) == self.cfg.rows_per_batch:
                yield self._collate(rows)
                rows = []
        if rows:
            yield self._collate(rows)

    def _admit(self, sample: TokenizedSample) -> None:
        """Validate `sample` against the row limits and insert it into the sorted buffer."""
        n_images = _check_sample(sample, self.image_token_id)
        if len(sample) > self.cfg.max_tokens:
            raise ValueError(
                f"{_describe(sample)} has {len(sample)} tokens > max_tokens={self.cfg.max_tokens}; "
                "truncate at tokenisation (max_length <= packing max_tokens)"
            )
        if n_images > self.cfg.max_images_per_row:
            raise ValueError(
                f"{_describe(sample)} has {n_images} images > "
                f"max_images_per_row={self.cfg.max_images_per_row}"
            )
        if sample.index >= 0:
            if sample.index < self._next_index:
                raise ValueError(
                    f"{_describe(sample)} arrived after index {self._next_index - 1}: the stream "
                    "must be in increasing epoch order (a resumed stream starts at next_index)"
                )
            self._next_index = sample.index + 1
            order = sample.index
        else:
            self._ad_hoc = True
            order = self._arrivals
        self._arrivals += 1
        entry = (-len(sample), splitmix64(self.cfg.seed, order), order, n_images, sample)
        bisect.insort(self._buffer, entry, key=lambda e: e[:3])
        self._buffer_tokens += len(sample)
        self._buffer_images += n_images

    def _take_row(self) -> list[TokenizedSample]:
        """Remove one row from the buffer: the longest sample, then longest-that-fits fillers.

        Fillers are paced on images: while the row holds fewer images per token than the buffer
        does, an image-carrying filler is preferred, otherwise a text-only one. Without pacing,
        short captioned samples (cheap in tokens, one image each) pile up in the buffer and the
        final rows hit the image budget half empty.
        """
        first = self._pop(0)
        row = [first[4]]
        tokens, images = len(first[4]), first[3]
        while tokens < self.cfg.max_tokens and self._buffer:
            room = self.cfg.max_tokens - tokens
            images_left = self.cfg.max_images_per_row - images
            want_images = images * self._buffer_tokens < self._buffer_images * tokens
            start = bisect.bisect_left(self._buffer, (-room,), key=lambda e: e[:1])
            fits = [j for j in range(start, len(self._buffer)) if self._buffer[j][3] <= images_left]
            if not fits:
                break
            pick = next((j for j in fits if (self._buffer[j][3] > 0) == want_images), fits[0])
            entry = self._pop(pick)
            row.append(entry[4])
            tokens += len(entry[4])
            images += entry[3]
        return row

    def _pop(self, position: int) -> _Entry:
        entry = self._buffer.pop(position)
        self._buffer_tokens -= len(entry[4])
        self._buffer_images -= entry[3]
        return entry

    def _collate(self, rows: list[list[TokenizedSample]]) -> PackedBatch:
        samples = [s for row in rows for s in row]
        return collate(
            samples,
            row_tokens=self.cfg.max_tokens,
            num_rows=len(rows),
            image_token_id=self.image_token_id,
            media_attention=self.media_attention,
            media_seed=self.media_seed,
            image_size=self.image_size,
        )
