"""`mmgpt data inspect` can be trusted (issue 12 item 7): it tokenises with the run's tokenizer
(warning loudly on the bundled tiny fallback), exits 2 naming a source that keeps nothing, says
why fewer records were selected than read, estimates packed rows and optimizer steps per epoch
exactly as training counts them, and shows progress on long scans."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from data_helpers import screened_dataset, write_config, write_lines
from mmgpt.cli import main
from mmgpt.data.inspection import Progress

WARNING = "WARNING: no --train-config or --tokenizer given"


def train_config(path: Path, mixture: Path, **sections) -> Path:
    data = {"mixture": str(mixture), "output_dir": str(path.parent / "out"), "model": {"preset": "tiny"},
            "packing": {"max_tokens": 256, "max_images_per_row": 8, "buffer_size": 16, "rows_per_batch": 1},
            "schedule": {"grad_accum": 1}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def screened(tmp_path) -> Path:
    root = screened_dataset(tmp_path, bad=False)
    return write_config(root / "mixture.yaml", [
        {"name": "dolly", "type": "dolly", "path": "dolly.jsonl"},
        {"name": "llava", "type": "llava", "path": "llava.json", "image_root": "img"},
    ], max_length=128, language_vl_ratio=None, image_size=32)


def inspect(argv: list[str], capsys, tmp_path: Path) -> tuple[int, str, str, dict]:
    out = tmp_path / "report.json"
    code = main(["data", "inspect", *argv, "--show", "0", "--json", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, json.loads(out.read_text())


def test_tiny_tokenizer_fallback_warns_loudly(screened, tmp_path, capsys):
    code, out, err, _ = inspect(["--config", str(screened)], capsys, tmp_path)
    assert code == 0
    assert err.count(WARNING) == 1 and "bundled TINY tokenizer" in err and "differ from the run's" in err
    assert "pass --train-config for the run's packing" in out  # no estimate without the run's settings


def test_train_config_tokenizer_is_the_one_training_loads(screened, tmp_path, capsys, monkeypatch):
    import mmgpt.tokenizer
    from mmgpt.train.config import TrainConfig
    from mmgpt.models.builder import tokenizer_path

    tok_dir = shutil.copytree(mmgpt.tokenizer.TINY_TOKENIZER_DIR, tmp_path / "run_tokenizer")
    cfg = train_config(tmp_path / "train.yaml", screened, model={"tokenizer_path": "run_tokenizer"})
    loaded: list[Path] = []
    real = mmgpt.tokenizer.load_tokenizer
    monkeypatch.setattr(mmgpt.tokenizer, "load_tokenizer", lambda path: loaded.append(Path(path)) or real(path))
    code, _, err, _ = inspect(["--train-config", str(cfg)], capsys, tmp_path)
    assert code == 0 and WARNING not in err
    assert loaded == [tok_dir] == [Path(tokenizer_path(TrainConfig.load(cfg).model))]


@pytest.mark.parametrize("model, message", [
    ({"tokenizer_path": "no_such_dir"}, "tokenizer directory not found"),
    ({"tokenizer_path": "empty_dir"}, "cannot load a tokenizer from"),
    ({"preset": "9b"}, "bundles no tokenizer"),
])
def test_bad_run_tokenizer_is_one_line(screened, tmp_path, capsys, model, message):
    (tmp_path / "empty_dir").mkdir()
    cfg = train_config(tmp_path / "train.yaml", screened, model=model)
    assert main(["data", "inspect", "--train-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmgpt data inspect: error: ") and message in err, err


def test_source_keeping_nothing_exits_2_naming_it(tmp_path, capsys):
    root = screened_dataset(tmp_path, bad=False)
    empty = {"instruction": "Say nothing.", "context": "", "response": " ", "category": "x"}
    write_lines(root / "silent.jsonl", [json.dumps(empty)] * 3)
    cfg = write_config(root / "mixture.yaml", [
        {"name": "dolly", "type": "dolly", "path": "dolly.jsonl"},
        {"name": "silent", "type": "dolly", "path": "silent.jsonl"},
        {"name": "llava", "type": "llava", "path": "llava.json", "image_root": "img", "sample": 0},
    ], max_length=128, language_vl_ratio=None)
    code, out, err, report = inspect(["--config", str(cfg)], capsys, tmp_path)
    assert code == 2
    assert out.startswith("source") and "dolly" in out  # the report is still printed
    errors = [line for line in err.splitlines() if line.startswith("mmgpt data inspect: error: ")]
    assert len(errors) == 2
    assert "source 'silent' keeps no records (read 3)" in errors[0] and "empty_response=3" in errors[0]
    assert "source 'llava' keeps no records (read 20)" in errors[1] and "sample: 0" in errors[1]
    assert report["sources"]["dolly"]["kept"] == 30


def test_selected_below_read_is_explained(tmp_path, capsys):
    root = screened_dataset(tmp_path, bad=True)  # a malformed dolly line, two unusable llava images
    cfg = write_config(root / "mixture.yaml", [
        {"name": "dolly", "type": "dolly", "path": "dolly.jsonl", "sample": 12},
        {"name": "llava", "type": "llava", "path": "llava.json", "image_root": "img"},
    ], max_length=128, language_vl_ratio=0.5, image_size=32)
    tcfg = train_config(tmp_path / "train.yaml", cfg, eval={"holdout": 2})
    code, out, _, report = inspect(["--train-config", str(tcfg)], capsys, tmp_path)
    assert code == 0
    dolly, llava = report["sources"]["dolly"], report["sources"]["llava"]
    # dolly: 31 read -> 30 usable -> 28 after the holdout -> 12 sampled -> 9 by the ratio (0.5 x 18 VL)
    assert (dolly["read"], dolly["usable"], dolly["held_out"], dolly["selected"]) == (31, 30, 2, 9)
    assert dolly["notes"] == [
        "1 record(s) unusable before sampling (malformed_json=1): 30 usable of 31 read",
        "2 held out for evaluation (eval.holdout: 2), never trained on: 28 left",
        "sampling (sample: 12) draws 12 of the 28 available",
        "language_vl_ratio: 0.5 subsamples this side: 9 of 12 selected",
    ]
    assert (llava["read"], llava["usable"], llava["held_out"], llava["selected"]) == (22, 20, 2, 18)
    assert llava["notes"] == [
        "2 record(s) unusable before sampling (missing_image=1, path_escapes_root=1): 20 usable of 22 read",
        "2 held out for evaluation (eval.holdout: 2), never trained on: 18 left",
    ]
    for name in ("dolly", "llava"):
        for note in report["sources"][name]["notes"]:
            assert f"[{name}] {note}" in out
    header = out.splitlines()[0].split()
    assert header[:6] == ["source", "read", "usable", "held_out", "selected", "kept"]


def test_ratio_subsampling_is_explained(screened, tmp_path, capsys):
    cfg = yaml.safe_load(screened.read_text())
    cfg["language_vl_ratio"] = 1.0  # 30 dolly : 20 llava -> 20 dolly of 30
    screened.write_text(yaml.safe_dump(cfg))
    _, out, _, report = inspect(["--config", str(screened)], capsys, tmp_path)
    assert report["sources"]["dolly"]["selected"] == 20
    assert report["sources"]["dolly"]["notes"] == ["language_vl_ratio: 1.0 subsamples this side: 20 of 30 selected"]
    assert report["sources"]["llava"]["notes"] == []
    assert "[dolly] language_vl_ratio: 1.0 subsamples this side" in out


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    assert main(["data", "sample", "--out", str(out), "--n", "160", "--image-size", "32", "--max-length", "512"]) == 0
    return train_config(out / "train.yaml", out / "mixture.yaml",
                        packing={"max_tokens": 512, "buffer_size": 8, "rows_per_batch": 2},
                        schedule={"grad_accum": 2, "epochs": 3}, eval={"holdout": 1})


def test_estimate_matches_the_training_data_path(sample_run, tmp_path, capsys):
    """Rows and steps per epoch are what the training code gets: RankStream's batches (the loader's
    real packed stream) on every rank, and prepare()'s steps formula over count_batches."""
    from mmgpt.train.config import TrainConfig
    from mmgpt.data.mixture import Mixture, MixtureConfig
    from mmgpt.models.builder import build_model, preset_image_size
    from mmgpt.train.data import RankStream, count_batches

    world = 2
    code, out, _, report = inspect(["--train-config", str(sample_run), "--world-size", str(world)], capsys, tmp_path)
    assert code == 0
    est = report["estimate"]

    cfg = TrainConfig.load(sample_run)
    built = build_model(cfg.model)
    model, tokenizer = built.model, built.tokenizer
    image_size = preset_image_size(cfg.model.preset)
    mixture = Mixture(MixtureConfig.load(cfg.mixture), tokenizer, image_size,
                      max_images=cfg.packing.max_images_per_row, holdout=cfg.eval.holdout)
    rows, batches = 0, []
    for rank in range(world):
        stream = RankStream(mixture, cfg.packing, built, rank, world)
        n = 0
        while (batch := stream.next_batch()) is not None:
            rows += batch.num_rows
            n += 1
        batches.append(n)
        assert n == count_batches(mixture, cfg.packing, model.image_token_id, rank, world)
    assert est["rows_per_epoch"] == rows and est["micro_batches_per_rank"] == batches
    assert est["steps_per_epoch"] == min(batches) // cfg.schedule.grad_accum > 0
    assert est["total_steps"] == 3 * est["steps_per_epoch"] and est["rows_per_step"] == 2 * 2 * world
    assert rows > min(batches)  # rows_per_batch 2 really packs two rows per micro-batch
    assert f"optimizer steps: {est['steps_per_epoch']}" in out and f"packed rows: {rows}" in out
    assert f"grad_accum 2 x world {world} = {4 * world} rows" in out


def test_progress_lines_with_a_small_threshold(sample_run, tmp_path, capsys):
    code, _, err, report = inspect(["--train-config", str(sample_run), "--progress-every", "25"], capsys, tmp_path)
    assert code == 0
    total = report["samples"]
    lines = [line for line in err.splitlines() if line.startswith("inspect: loaded: ")]
    expected = sorted({*range(25, total + 1, 25), total})
    assert [line.split()[2] for line in lines] == [f"{n:,}/{total:,}" for n in expected]
    assert any(line.startswith("inspect: estimate rank 0: tokenised: 25/") for line in err.splitlines())
    code, _, quiet, _ = inspect(["--train-config", str(sample_run)], capsys, tmp_path)
    assert code == 0 and "inspect:" not in quiet  # a short scan says nothing by default


def test_progress_is_time_based_by_default():
    now = [0.0]
    stream = io.StringIO()
    bar = Progress("scan", 100_000, stream=stream, seconds=2.0, clock=lambda: now[0])
    for done in range(1, 100_001):
        now[0] = done * 0.0001  # 10 s in all: a line every 2 s, then the last one
        bar.update(done)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "scan: 20,000/100,000 samples (2.0 s)"
    assert len(lines) == 5 and lines[-1] == "scan: 100,000/100,000 samples (10.0 s)"
    short = io.StringIO()
    fast = Progress("scan", 10, stream=short, seconds=2.0, clock=lambda: 0.0)
    for done in range(1, 11):
        fast.update(done)
    assert short.getvalue() == ""
