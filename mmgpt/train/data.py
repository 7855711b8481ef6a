"""This rank's training stream: its share of the epoch, packed, with a resumable position.

Sharding is by sample: rank r of w reads epoch positions r, r+w, r+2w, ... (in epoch order) and
packs them itself, so each sample is tokenised and its images decoded on exactly one rank. The
position is (epoch, packer state); the packer state names the samples still buffered and the next
epoch position, so a resumed stream yields exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

import torch

from mmgpt.contracts import PackedBatch, TokenizedSample
from mmgpt.data.conversation import tokenize
from mmgpt.data.mixture import MAX_ERROR_EXAMPLES, Mixture
from mmgpt.data.packing import Packer, PackingConfig
from mmgpt.media import splitmix64


class RankStream:
    """PackedBatches of rank `rank` of `world`, for `epochs` passes over the mixture."""

    def __init__(self, mixture: Mixture, packing: PackingConfig, image_token_id: int, image_size: int,
                 rank: int, world: int, epochs: int = 1, state: dict[str, Any] | None = None,
                 media_attention: str = "next"):
        self.mixture = mixture
        self.media_attention = media_attention
        self.packing = packing
        self.image_token_id = image_token_id
        self.image_size = (image_size, image_size)
        self.rank = rank
        self.world = world
        self.epochs = epochs
        self.epoch = 0 if state is None else int(state["epoch"])
        self._packer: Packer
        self._batches: Iterator[PackedBatch]
        self._start_epoch(None if state is None else state["packer"])

    def _samples(self, start: int) -> Iterator[TokenizedSample]:
        """This rank's samples from epoch position `start` on (dropped ones are skipped)."""
        first = start + (self.rank - start) % self.world
        for i in range(first, len(self.mixture), self.world):
            sample = self.mixture.load(i)
            if sample is not None:
                yield sample

    def _start_epoch(self, packer_state: dict | None) -> None:
        # random media attention: a new coin per sample and epoch, the same after a resume
        media = dict(media_attention=self.media_attention, media_seed=splitmix64(self.packing.seed, self.epoch))
        if packer_state is None:
            self._packer = Packer(self.packing, self.image_token_id, self.image_size, **media)
            start = 0
        else:
            self._packer = Packer.resume(self.packing, self.image_token_id, packer_state,
                                         self.mixture.load, self.image_size, **media)
            start = int(packer_state["next_index"])
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

    def window(self, accum: int) -> list[PackedBatch]:
        """Up to `accum` batches (fewer only at the very end of the data)."""
        batches = []
        while len(batches) < accum and (batch := self.next_batch()) is not None:
            batches.append(batch)
        return batches

    def state(self) -> dict[str, Any]:
        """Position after the last batch handed out (JSON-serialisable)."""
        return {"epoch": self.epoch, "packer": self._packer.state()}


def count_batches(mixture: Mixture, packing: PackingConfig, image_token_id: int, rank: int, world: int) -> int:
    """PackedBatches this rank will get from one epoch, from token lengths alone (no image decoding).

    Used to size the LR schedule before training; a sample whose image later fails to load makes
    the real count a little smaller, and the loop then simply ends at the real end of the data.
    """
    def lengths_only() -> Iterator[TokenizedSample]:
        for i in range(rank, len(mixture), world):
            sample = tokenize(mixture.conversation(i), mixture.tokenizer, mixture.cfg.max_length)
            if isinstance(sample, str):
                continue
            n_images = sum(1 for t in sample.input_ids if t == image_token_id)
            sample.images = [torch.zeros(3, 1, 1)] * n_images
            sample.index = i
            yield sample

    return sum(1 for _ in Packer(packing, image_token_id, (1, 1)).pack(lengths_only()))


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One DataReport dict from every rank's. What the mixture found while being built (read,
    selected, drops before sampling) is the same on all ranks and counted once; what happened at
    load time (kept, drops found by loading, errors) is summed over the shards."""
    merged = {"sources": {}}
    for report in reports:
        for name, src in report["sources"].items():
            if name not in merged["sources"]:
                built = Counter(src["dropped"]) - Counter(src["dropped_at_load"])
                merged["sources"][name] = {"read": src["read"], "selected": src["selected"], "kept": 0,
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
