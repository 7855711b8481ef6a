"""Valid-JSON records that used to crash a run (issue 11): each is one counted drop, under a named
reason, in `inspect_mixture`, in `mmgpt data inspect` (a real process, strict UTF-8 stdout) and
in a 2-rank training run, and the good records kept are exactly those kept without them."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import yaml

from data_helpers import HOSTILE_DROPS, HOSTILE_MAX_IMAGES, hostile_dataset, pixel_bomb_png
from mmgpt.data.images import open_rgb
from mmgpt.data.inspection import inspect_mixture
from mmgpt.data.mixture import Mixture, MixtureConfig

REPO = Path(__file__).resolve().parent.parent
PYTHONPATH = [str(REPO), str(REPO / "kernels"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(PYTHONPATH)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    return {name: hostile_dataset(root / name, hostile=name == "hostile") for name in ("clean", "hostile")}


def _kept(mix: Mixture) -> list:
    """Every kept sample's content, order-free (the hostile mixture's epoch has more positions)."""
    samples = [s for s in map(mix.load, range(len(mix))) if s is not None]
    return sorted((s.source, s.input_ids, s.labels, [img.tolist() for img in s.images]) for s in samples)


def test_every_hostile_record_is_one_named_drop(datasets, tiny_tokenizer):
    clean, hostile = (Mixture(MixtureConfig.load(datasets[n]), tiny_tokenizer, max_images=HOSTILE_MAX_IMAGES)
                      for n in ("clean", "hostile"))
    kept = _kept(clean)
    assert kept == _kept(hostile) and len(kept) == 16
    report = inspect_mixture(hostile, show=0)["sources"]
    assert {n: s["dropped"] for n, s in report.items()} == HOSTILE_DROPS
    assert {n: s["read"] - clean.report.sources[n].read for n, s in report.items()} == {
        n: sum(d.values()) for n, d in HOSTILE_DROPS.items()}
    assert report["mine"]["dropped_at_load"] == {"image_too_large": 1}  # only decoding reads a header
    errors = "\n".join(e for s in report.values() for e in s["errors"])
    for where in ("dolly.jsonl line 3: bad_text", "dolly.jsonl: line 4: field 'instruction': number_too_long",
                  "dolly.jsonl: line 5: nesting_too_deep", r"mine.jsonl line 2: image 'x\ud800.jpg'",
                  "mine.jsonl line 3: image 'loop/0.jpg'", "mine.jsonl line 4: image 'nnnn",
                  "mine.jsonl line 5: too_many_images: 3 images > max_images_per_row=2",
                  "mine.jsonl line 6: image 'bomb.png' under", "max_image_pixels=64000000",
                  "aokvqa.json record 1 question_id q1000",
                  "aokvqa.json: record 2: field 'question': empty_instruction"):
        assert where in errors, where
    errors.encode("utf-8")  # lone surrogates are escaped: printable and loggable


def test_without_max_images_the_record_is_kept(datasets, tiny_tokenizer):
    report = Mixture(MixtureConfig.load(datasets["hostile"]), tiny_tokenizer).report.sources["mine"]
    assert "too_many_images" not in report.dropped and report.selected == 7  # 5 good + 3 images + bomb


def test_cli_inspect_with_the_train_config_limit(datasets, tmp_path):
    """The real entry point: stdout is strict UTF-8, so one unescaped surrogate would crash it."""
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({"mixture": str(datasets["hostile"]), "output_dir": str(tmp_path / "o"),
                                         "packing": {"max_images_per_row": HOSTILE_MAX_IMAGES}}))
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "mmgpt.cli", "data", "inspect", "--train-config", str(train_cfg),
                           "--json", str(out), "--show", "20"], capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sources = json.loads(out.read_text())["sources"]
    assert {n: s["dropped"] for n, s in sources.items()} == HOSTILE_DROPS
    assert {n: s["kept"] for n, s in sources.items()} == {"dolly": 8, "mine": 5, "aokvqa": 3}
    assert "image_too_large=1" in proc.stdout and "--- example" in proc.stdout


MEASURE = """
import json, resource, sys
from pathlib import Path
from mmgpt.data.images import load_image
from mmgpt.image_transform import clip_transform
transform = clip_transform(16)
assert not isinstance(load_image(Path(sys.argv[1]), "small.png", transform), str)  # warm: PNG plugin
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reason = load_image(Path(sys.argv[1]), "bomb.png", transform)
print(json.dumps([reason, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]))
"""


def test_pixel_bomb_is_refused_from_its_header(tmp_path):
    """169 megapixels in ~20 KB: decoding it in full grows the peak RSS by ~800 MB (1-bit + RGB)."""
    bomb = pixel_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 64_000
    PIL.Image.new("1", (64, 64)).save(tmp_path / "small.png")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                          env=ENV, timeout=300, check=True)
    reason, growth_kib = json.loads(proc.stdout)
    assert reason == "image_too_large"
    assert growth_kib < 20 * 1024, growth_kib  # peak RSS growth: far below the 169 MB of one byte per pixel
    assert "DecompressionBombWarning" not in proc.stderr


def test_pils_own_bomb_limit_and_images_from_memory(tmp_path):
    """With our cap off, PIL's bomb error (past 2 x Image.MAX_IMAGE_PIXELS) is the same refusal;
    chat and serve can hand `open_rgb` bytes."""
    bomb = pixel_bomb_png(tmp_path / "bomb.png", side=14000)
    assert open_rgb(bomb, max_pixels=None) == "image_too_large"
    assert open_rgb(io.BytesIO(bomb.read_bytes())) == "image_too_large"
    assert open_rgb(io.BytesIO(b"\x89PNG\r\n\x1a\n not really")) == "corrupt_image"
    small = io.BytesIO()
    PIL.Image.new("L", (7, 5)).save(small, format="PNG")
    assert open_rgb(small, max_pixels=35).size == (7, 5) and open_rgb(small, max_pixels=34) == "image_too_large"


@pytest.mark.skipif(subprocess.run(["which", "deepspeed"], capture_output=True).returncode != 0,
                    reason="deepspeed launcher not on PATH")
def test_two_rank_training_counts_the_same_drops(datasets, tmp_path):
    """What training sees: the same drops (the too_many_images limit needs train/recipe.py to pass
    max_images=cfg.packing.max_images_per_row; with the demo's 16 the 3-image record trains)."""
    cfg = yaml.safe_load((REPO / "configs" / "demo_tiny.yaml").read_text())
    cfg.update({"mixture": str(datasets["hostile"]), "output_dir": str(tmp_path / "run"),
                "deepspeed": str(REPO / "ds_configs" / "zero2.json"), "save_every": 100})
    cfg["packing"].update({"max_tokens": 256, "buffer_size": 8})
    cfg["schedule"].update({"grad_accum": 1, "warmup_steps": 1, "epochs": 1})
    cfg.pop("eval", None)  # no held-out split: every kept record trains
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module",
                           "mmgpt.train.cli", "--config", str(tmp_path / "train.yaml")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sources = json.loads((tmp_path / "run" / "data_report.json").read_text())["sources"]
    expected = {n: {r: c for r, c in d.items() if r != "too_many_images"} for n, d in HOSTILE_DROPS.items()}
    assert {n: s["dropped"] for n, s in sources.items()} == expected
    assert {n: s["kept"] for n, s in sources.items()} == {"dolly": 8, "mine": 6, "aokvqa": 3}
