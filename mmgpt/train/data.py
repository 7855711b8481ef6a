"""This rank's training stream: its share of the epoch, packed, with a resumable position.

Sharding is by sample: rank r of w reads epoch positions r, r+w, r+2w, ... (in epoch order) and
packs them itself, so each sample is tokenised and its images decoded on exactly one rank. The
position is a `StreamPosition` (epoch, `PackerState`); the packer state names the samples still
buffered and the next epoch position, so a resumed stream yields exactly the batches the
uninterrupted one would have.

`BatchLoader` serves the trainer: with `workers=1` a DataLoader worker process reads, decodes,
tokenises and packs ahead (the packer is sequential, so one worker per rank), and each batch
travels with the stream position right after it. The loader's `state()` is the position after the
last batch the trainer CONSUMED, not the worker's read-ahead, so checkpoints resume exactly.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import signal
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from mmgpt.contracts import PackedBatch, TokenizedSample
from mmgpt.data.conversation import tokenize
from mmgpt.data.mixture import MAX_ERROR_EXAMPLES, Mixture
from mmgpt.data.packing import Packer, PackerState, PackingConfig
from mmgpt.media import splitmix64
from mmgpt.models.builder import BuiltModel


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's stream stands after a batch: the epoch and the packer's state in it. A
    checkpoint stores every rank's `to_dict()`; `from_dict` reads it (the same form since the
    first checkpoints, so old ones resume)."""

    epoch: int = 0
    packer: PackerState = PackerState()

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "packer": self.packer.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StreamPosition":
        return cls(int(data["epoch"]), PackerState.from_dict(data["packer"]))

    def consumed(self, rank: int, world: int, epoch_len: int) -> int:
        """This rank's consumed samples in epoch units x epoch_len: its shard (positions rank,
        rank + world, ...) of every finished epoch, plus its positions below the packer's
        next_index that are no longer buffered. Summed over ranks and divided by epoch_len: epochs
        done (1.0 at the end of the first). Dropped records count as consumed: they are behind the
        position too."""
        def shard(n: int) -> int:  # positions rank, rank + world, ... below n
            return max(0, (n - rank + world - 1) // world)

        return self.epoch * shard(epoch_len) + shard(self.packer.next_index) - len(self.packer.buffer)


class RankStream:
    """PackedBatches of rank `rank` of `world`, for `epochs` passes over the mixture, packed for
    `built` (its `<image>` id, image size and media attention; the model itself is not kept, so a
    data worker never holds it)."""

    def __init__(self, mixture: Mixture, packing: PackingConfig, built: BuiltModel, rank: int, world: int,
                 epochs: int = 1, state: dict[str, Any] | None = None):
        self.mixture = mixture
        self.media_attention = built.media_attention
        self.packing = packing
        self.image_token_id = built.image_token_id
        self.image_size = (built.image_size, built.image_size)
        self.rank = rank
        self.world = world
        self.epochs = epochs
        position = None if state is None else StreamPosition.from_dict(state)  # as a checkpoint stored it
        self.epoch = 0 if position is None else position.epoch
        # epoch position being loaded now; shared memory, so a worker's parent can name the record
        self._loading = multiprocessing.RawValue("q", -1)
        self._packer: Packer
        self._batches: Iterator[PackedBatch]
        self._start_epoch(None if position is None else position.packer)

    def _samples(self, start: int) -> Iterator[TokenizedSample]:
        """This rank's samples from epoch position `start` on (dropped ones are skipped)."""
        first = start + (self.rank - start) % self.world
        for i in range(first, len(self.mixture), self.world):
            sample = self._load(i)
            if sample is not None:
                yield sample

    def _load(self, i: int) -> TokenizedSample | None:
        self._loading.value = i
        return self.mixture.load(i)

    @property
    def loading(self) -> int:
        """The epoch position last handed to `mixture.load` (-1: none yet), also from a worker."""
        return self._loading.value

    def _start_epoch(self, packer_state: PackerState | None) -> None:
        # random media attention: a new coin per sample and epoch, the same after a resume
        media = dict(media_attention=self.media_attention, media_seed=splitmix64(self.packing.seed, self.epoch))
        if packer_state is None:
            self._packer = Packer(self.packing, self.image_token_id, self.image_size, **media)
            start = 0
        else:
            self._packer = Packer.resume(self.packing, self.image_token_id, packer_state,
                                         self._load, self.image_size, **media)
            start = packer_state.next_index
        self._batches = self._packer.pack(self._samples(start))

    def next_batch(self) -> PackedBatch | None:
        """The next PackedBatch, or None once every epoch is used up."""
        while True:
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            if self.epoch + 1 >= self.epochs:
                return None
            self.epoch += 1
            self._start_epoch(None)

    def state(self) -> StreamPosition:
        """Position after the last batch handed out."""
        return StreamPosition(self.epoch, self._packer.state())

    def consumed(self, position: StreamPosition) -> int:
        """This rank's samples behind `position` (`StreamPosition.consumed`)."""
        return position.consumed(self.rank, self.world, len(self.mixture))

    def source_names(self) -> list[str]:
        """The mixture's sources, in config order (per-source losses are kept in this order)."""
        return [source.name for source in self.mixture.cfg.sources]

    @property
    def epoch_length(self) -> int:
        """Records in one epoch (every rank's share, dropped ones included)."""
        return len(self.mixture)

    def items(self) -> Iterator["StreamItem"]:
        """Every remaining batch with the position and data report right after it, then one item
        without a batch: the report once the data is used up (drops after the last batch, or in a
        stream that packs no batch at all, are counted too)."""
        while (batch := self.next_batch()) is not None:
            yield StreamItem(batch, self.state(), self.mixture.report.to_dict())
        yield StreamItem(None, self.state(), self.mixture.report.to_dict())


@dataclass
class StreamItem:
    """One batch as it leaves the packer: the stream position and the mixture's drop report right
    after it (the worker's report, which the parent process never sees otherwise)."""

    batch: PackedBatch | None  # None: the end of the data
    state: StreamPosition
    report: dict[str, Any]

    def pin_memory(self) -> "StreamItem":
        """Called by the DataLoader's pin thread: page-locked tensors copy to the GPU asynchronously."""
        if self.batch is None:
            return self
        return dataclasses.replace(self, batch=_map_tensors(self.batch, torch.Tensor.pin_memory))


def _map_tensors(obj: Any, fn: Any) -> Any:
    """`obj` (a dataclass such as PackedBatch or MediaLayout) with `fn` applied to every tensor in it."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = fn(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _map_tensors(value, fn)
    return dataclasses.replace(obj, **changes)


class _WorkerItems(IterableDataset):
    """The stream as a DataLoader dataset: the worker process owns (a copy of) the RankStream."""

    def __init__(self, stream: RankStream):
        self.stream = stream

    def __iter__(self) -> Iterator[StreamItem]:
        return self.stream.items()


class DataWorkerError(RuntimeError):
    """The background data worker failed or died; names the record it was loading."""


class BatchLoader:
    """Accumulation windows for the trainer, packed in-process (`workers=0`) or ahead in a worker.

    With a worker, `prefetch` batches are kept in flight (the loop asks for at least two windows'
    worth) and, on CUDA, pinned. Batches, positions and reports are the in-process ones, bitwise.
    """

    def __init__(self, stream: RankStream, workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
        if workers not in (0, 1):
            raise ValueError(f"data_workers must be 0 or 1 (the packer is sequential), got {workers}")
        self.stream = stream
        self.workers = workers
        self._state = stream.state()
        self._report = stream.mixture.report.to_dict()
        self._items: Iterator[StreamItem] | None
        if workers:
            # iterated once (RankStream runs the epochs), so the worker lives as long as the iterator
            self._items = iter(DataLoader(_WorkerItems(stream), batch_size=None, num_workers=workers,
                                          prefetch_factor=prefetch, pin_memory=pin_memory,
                                          worker_init_fn=_ignore_stop_signals))
        else:
            self._items = stream.items()

    def _next(self) -> StreamItem | None:
        if self._items is None:
            return None
        try:
            item = next(self._items)
        except StopIteration:
            item = None
        except Exception as err:
            if not self.workers:
                raise
            raise DataWorkerError(f"rank {self.stream.rank}: the data worker failed {self._where()}: "
                                  f"{type(err).__name__}: {err}") from err
        if item is not None and item.batch is None:  # the end: its report counts every drop
            self._report = item.report
            item = None
        if item is None:
            self.close()
        return item

    def _where(self) -> str:
        i = self.stream.loading
        if i < 0:
            return "before loading any record"
        return f"while loading epoch position {i} ({self.stream.mixture.conversation(i).origin})"

    def window(self, accum: int) -> list[PackedBatch]:
        """Up to `accum` batches (fewer only at the very end of the data)."""
        batches = []
        while len(batches) < accum and (item := self._next()) is not None:
            batches.append(item.batch)
            self._state, self._report = item.state, item.report
        return batches

    def state(self) -> StreamPosition:
        """Stream position after the last batch handed to the trainer."""
        return self._state

    def consumed(self) -> int:
        """This rank's samples behind that position (for the epoch count)."""
        return self.stream.consumed(self._state)

    def source_names(self) -> list[str]:
        return self.stream.source_names()

    @property
    def epoch_length(self) -> int:
        return self.stream.epoch_length

    def report(self) -> dict[str, Any]:
        """The mixture's DataReport (dict) as of the last batch handed to the trainer."""
        return self._report

    def close(self) -> None:
        """Stop the worker (idempotent); the loader then reports the end of the data."""
        self._items = None


def _ignore_stop_signals(worker_id: int) -> None:
    """The worker outlives SIGTERM/SIGINT (a Ctrl-C or DeepSpeed's launch.py signals the whole
    process tree): its rank finishes the step and saves first (train/stop.py), then closes it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class RankPlan:
    """What one rank's epoch packs into, from token lengths alone: PackedBatches (micro-batches),
    rows and samples."""

    batches: int
    rows: int
    samples: int


def plan_rank(mixture: Mixture, packing: PackingConfig, image_token_id: int, rank: int, world: int,
              progress: Callable[[int], None] | None = None) -> RankPlan:
    """This rank's epoch packed by the real Packer from token lengths alone (no image decoding).

    Used to size the LR schedule before training (`count_batches`) and by `mmgpt data inspect`
    for its estimate; a sample whose image later fails to load makes the real count a little
    smaller, and the loop then simply ends at the real end of the data. `progress(n)` is called
    with the number of this rank's positions tokenised so far.
    """
    def lengths_only() -> Iterator[TokenizedSample]:
        for n, i in enumerate(range(rank, len(mixture), world), 1):
            if progress is not None:
                progress(n)
            sample = tokenize(mixture.conversation(i), mixture.tokenizer, mixture.cfg.max_length)
            if isinstance(sample, str):
                continue
            n_images = sum(1 for t in sample.input_ids if t == image_token_id)
            sample.images = [torch.zeros(3, 1, 1)] * n_images
            sample.index = i
            yield sample

    plan = RankPlan(0, 0, 0)
    for batch in Packer(packing, image_token_id, (1, 1)).pack(lengths_only()):
        plan.batches += 1
        plan.rows += batch.num_rows
        plan.samples += len(batch.seqlens)
    return plan


def count_batches(mixture: Mixture, packing: PackingConfig, image_token_id: int, rank: int, world: int) -> int:
    """PackedBatches this rank will get from one epoch (`plan_rank`): what sizes the LR schedule."""
    return plan_rank(mixture, packing, image_token_id, rank, world).batches


def steps_per_epoch(batches_per_rank: list[int], grad_accum: int) -> int:
    """Optimizer steps of one epoch: every rank steps together, so the rank with the fewest
    micro-batches decides (all_reduce_min in training), `grad_accum` micro-batches a step."""
    return min(batches_per_rank) // grad_accum


_LOAD_TIME = ("kept", "dropped", "dropped_at_load", "errors")  # a source report's per-shard entries


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One DataReport dict from every rank's. What the mixture found while being built (read,
    held out, selected, drops before sampling) is the same on all ranks and counted once; what
    happened at load time (kept, drops found by loading, errors) is summed over the shards."""
    merged = {"sources": {}}
    for report in reports:
        for name, src in report["sources"].items():
            if name not in merged["sources"]:
                built = Counter(src["dropped"]) - Counter(src["dropped_at_load"])
                merged["sources"][name] = {**{k: v for k, v in src.items() if k not in _LOAD_TIME}, "kept": 0,
                                           "dropped": built, "dropped_at_load": Counter(), "errors": []}
            into = merged["sources"][name]
            into["kept"] += src["kept"]
            into["dropped"] += Counter(src["dropped_at_load"])
            into["dropped_at_load"] += Counter(src["dropped_at_load"])
            into["errors"] = list(dict.fromkeys(into["errors"] + src["errors"]))[:MAX_ERROR_EXAMPLES]
    for src in merged["sources"].values():
        for key in ("dropped", "dropped_at_load"):
            src[key] = dict(sorted(src[key].items()))
    return merged
