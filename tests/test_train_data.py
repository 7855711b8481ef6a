"""Each rank's training stream: the shards cover the epoch once, a resumed stream continues the
data order exactly, the step-count pre-pass matches the real stream, reports merge over ranks;
a background worker yields the in-process batches bitwise and resumes from the consumed position."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mmgpt.data.mixture import Mixture, MixtureConfig
from mmgpt.data.packing import PackingConfig
from mmgpt.data.sample import write_sample
from mmgpt.models.builder import ModelConfig, build_model
from mmgpt.train.data import BatchLoader, DataWorkerError, RankStream, StreamPosition, count_batches, merge_reports

IMAGE_SIZE = 32
PACKING = PackingConfig(max_tokens=256, max_images_per_row=8, buffer_size=6, rows_per_batch=1, seed=3)


@pytest.fixture(scope="module")
def mixture(tiny_tokenizer, tmp_path_factory):
    data = write_sample(tmp_path_factory.mktemp("data"), records=80, max_length=256)
    return Mixture(MixtureConfig.load(data), tiny_tokenizer, IMAGE_SIZE)


@pytest.fixture(scope="module")
def built():
    """The tiny model's settings (a meta build: the stream reads its `<image>` id, image size and
    media attention, never its weights)."""
    built = build_model(ModelConfig(preset="tiny"), meta=True)
    assert built.image_size == IMAGE_SIZE
    return built


def drain(stream: RankStream) -> list[list[int]]:
    out = []
    while (batch := stream.next_batch()) is not None:
        out.append(batch.sample_ids)
    return out


def test_shards_cover_the_epoch_once(mixture, built):
    world = 3
    seen = []
    for rank in range(world):
        ids = [i for b in drain(RankStream(mixture, PACKING, built, rank, world)) for i in b]
        assert all(i % world == rank for i in ids)
        seen += ids
    kept = [i for i in range(len(mixture)) if mixture.load(i) is not None]
    assert sorted(seen) == kept


def test_resumed_stream_continues_exactly(mixture, built):
    rank, world = 1, 2
    full = drain(RankStream(mixture, PACKING, built, rank, world, epochs=2))
    for stop in (1, 4, len(full) // 2 - 1, len(full) // 2, len(full) // 2 + 1):  # incl. the epoch boundary
        first = RankStream(mixture, PACKING, built, rank, world, epochs=2)
        head = [first.next_batch().sample_ids for _ in range(stop)]
        state = json.loads(json.dumps(first.state().to_dict()))  # what the checkpoint stores
        resumed = RankStream(mixture, PACKING, built, rank, world, epochs=2, state=state)
        assert head + drain(resumed) == full, stop
    assert full[: len(full) // 2] == full[len(full) // 2:]  # 2 epochs of the same order


def test_a_position_stored_by_the_old_code_resumes_exactly(mixture, built):
    """tests/fixtures/stream_positions_5a0f41f.json was written by mmgpt at commit 5a0f41f (before
    the position was typed): `RankStream.state()` after k batches, through JSON as a checkpoint
    holds it, and the sample ids of the whole uninterrupted stream (this file's mixture and
    PACKING, rank 1 of 2, two epochs, random media attention). Today's code reads each stored
    position and continues exactly where that code would have."""
    old = json.loads((Path(__file__).parent / "fixtures" / "stream_positions_5a0f41f.json").read_text())
    rank, world, full = old["rank"], old["world"], old["sample_ids"]

    def stream(state=None):
        return RankStream(mixture, PACKING, dataclasses.replace(built, media_attention="random"), rank, world,
                          epochs=2, state=state)

    assert drain(stream()) == full  # today's stream is the one the positions were taken from
    assert len(old["positions_after_batches"]) == 5
    for stop, stored in old["positions_after_batches"].items():
        assert StreamPosition.from_dict(stored).to_dict() == stored  # read and written back unchanged
        assert drain(stream(stored)) == full[int(stop):], stop


def test_window_and_count(mixture, built):
    for rank in range(2):
        expected = count_batches(mixture, PACKING, built.image_token_id, rank, 2)
        loader = BatchLoader(RankStream(mixture, PACKING, built, rank, 2))
        windows = []
        while window := loader.window(3):
            windows.append(len(window))
        assert sum(windows) == expected
        assert windows[:-1] == [3] * (len(windows) - 1) and 1 <= windows[-1] <= 3


def test_merge_reports_counts_construction_drops_once_and_load_drops_per_shard():
    def report(kept, at_load, errors):  # every rank parsed the same file: 2 malformed lines
        dropped = {"malformed_json": 2, **{k: v + (k == "malformed_json") * 2 for k, v in at_load.items()}}
        return {"sources": {"a": {"read": 10, "selected": 8, "kept": kept, "dropped": dropped,
                                  "dropped_at_load": at_load, "errors": ["bad line"] + errors}}}

    merged = merge_reports([report(3, {"corrupt_image": 1}, ["x"]), report(3, {"corrupt_image": 1, "too_long": 1}, ["y"])])
    assert merged == {"sources": {"a": {
        "read": 10, "selected": 8, "kept": 6, "dropped": {"corrupt_image": 2, "malformed_json": 2, "too_long": 1},
        "dropped_at_load": {"corrupt_image": 2, "too_long": 1}, "errors": ["bad line", "x", "y"]}}}


def windows(loader: BatchLoader, accum: int) -> list[tuple[list, dict]]:
    """Every window of `loader` with the position the loader reports after it."""
    out = []
    while window := loader.window(accum):
        out.append((window, json.loads(json.dumps(loader.state().to_dict()))))
    return out


def assert_same_batches(got: list, want: list) -> None:
    assert [b.sample_ids for b in got] == [b.sample_ids for b in want]
    for a, b in zip(got, want):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if dataclasses.is_dataclass(x):
                x, y = dataclasses.astuple(x), dataclasses.astuple(y)
            for u, v in zip(x if isinstance(x, tuple) else [x], y if isinstance(y, tuple) else [y]):
                if isinstance(u, torch.Tensor):
                    assert u.dtype == v.dtype and torch.equal(u, v), f.name
                else:
                    assert u == v, f.name


def test_worker_batches_and_resume_are_bitwise_the_in_process_ones(mixture, built):
    rank, world, accum = 0, 2, 2

    def stream(state=None):
        return RankStream(mixture, PACKING, built, rank, world, epochs=2, state=state)

    inline = windows(BatchLoader(stream()), accum)
    background = windows(BatchLoader(stream(), workers=1, prefetch=2 * accum), accum)
    assert len(background) == len(inline) > 4
    for (got, got_state), (want, want_state) in zip(background, inline):
        assert_same_batches(got, want)
        assert got_state == want_state  # the consumed position, not the worker's read-ahead
    flat = [b for window, _ in inline for b in window]
    for k in (1, len(inline) // 2, len(inline) - 1):  # resume from the position after window k
        resumed = windows(BatchLoader(stream(inline[k - 1][1]), workers=1), accum)
        assert_same_batches([b for window, _ in resumed for b in window], flat[k * accum:])


def test_worker_reports_its_drops_like_in_process(mixture, built):
    def loader(workers):
        return BatchLoader(RankStream(mixture, PACKING, built, 1, 2), workers=workers)

    inline, background = loader(0), loader(1)
    for each in (inline, background):
        while each.window(3):
            pass
    assert background.report() == inline.report()


def test_a_failing_worker_names_the_record_it_was_loading(mixture, built, monkeypatch):
    load = mixture.load

    def broken(i):  # inherited by the forked worker
        if i == 12:
            raise OSError("disk gone")
        return load(i)

    monkeypatch.setattr(mixture, "load", broken)
    loader = BatchLoader(RankStream(mixture, PACKING, built, 0, 1), workers=1, prefetch=2)
    origin = mixture.conversation(12).origin
    with pytest.raises(DataWorkerError, match=rf"(?s)rank 0: the data worker failed while loading epoch position 12 "
                                              rf"\({origin}\): OSError: .*disk gone"):
        while loader.window(1):
            pass


def test_more_than_one_worker_is_refused(mixture, built):
    with pytest.raises(ValueError, match="data_workers must be 0 or 1"):
        BatchLoader(RankStream(mixture, PACKING, built, 0, 1), workers=2)


def test_drops_of_a_stream_that_packs_nothing_are_counted(mixture, built):
    """Issue 22: with every sample too long, data_report.json said kept 0, dropped {} (the report
    travelled only with batches). The end of the data now carries it, in-process and from a worker."""
    short = Mixture(dataclasses.replace(mixture.cfg, max_length=4), mixture.tokenizer, IMAGE_SIZE)
    for workers in (0, 1):
        loader = BatchLoader(RankStream(short, PACKING, built, 0, 2), workers=workers)
        assert loader.window(2) == []
        report = loader.report()["sources"]
        shard = len(range(0, len(short), 2))
        assert sum(r["dropped"].get("too_long", 0) for r in report.values()) == shard, (workers, report)
        assert sum(r["kept"] for r in report.values()) == 0
