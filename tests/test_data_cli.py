"""`mmgpt data sample` and `mmgpt data inspect` through the real entry point."""
from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest

from data_helpers import bad_input_dataset, screened_dataset, write_config
from mmgpt.cli import main
from mmgpt.data.mixture import Mixture, MixtureConfig
from mmgpt.data.sample import write_sample

ORIGINAL_LAYOUT = [
    "dolly/databricks-dolly-15k.jsonl",
    "alpaca_gpt4/alpaca_gpt4_data.json",
    "llava/detail_23k.json",
    "llava/complex_reasoning_77k.json",
    "llava/conversation_58k.json",
    "cc_sbu_align/filter_cap.json",
    "aokvqa/aokvqa_v1p0_train.json",
    "coco/annotations/coco_karpathy_train.json",
    "coco/annotations/captions_train2017.json",
    "ocrvqa/dataset.json",
    "my_data/conversations.jsonl",
    "mixture.yaml",
]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    assert main(["data", "sample", "--out", str(out), "--n", "300", "--image-size", "24"]) == 0
    return out


def test_sample_writes_original_layouts(sample_dir):
    for rel in ORIGINAL_LAYOUT:
        assert (sample_dir / rel).is_file(), rel
    minigpt4 = json.loads((sample_dir / "cc_sbu_align/filter_cap.json").read_text())["annotations"]
    assert all((sample_dir / "cc_sbu_align/image" / f"{a['image_id']}.jpg").is_file() for a in minigpt4)
    ocr = json.loads((sample_dir / "ocrvqa/dataset.json").read_text())
    assert all((sample_dir / "ocrvqa/images" / f"{k}.jpg").is_file() for k in ocr)
    with PIL.Image.open(next((sample_dir / "coco/images/train2017").iterdir())) as img:
        assert img.format == "JPEG" and 32 <= min(img.size) and max(img.size) <= 64
    cfg = MixtureConfig.load(sample_dir / "mixture.yaml")
    assert cfg.image_size == 24 and all(Path(s.path).is_file() for s in cfg.sources)


def test_sample_is_deterministic(sample_dir, tmp_path):
    write_sample(tmp_path, records=300, image_size=24)
    for rel in ORIGINAL_LAYOUT:
        assert (tmp_path / rel).read_bytes() == (sample_dir / rel).read_bytes(), rel


def test_inspect_sample_json_report(sample_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["data", "inspect", "--config", str(sample_dir / "mixture.yaml"), "--json", str(out),
                 "--show", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[[") >= 2 and "--- example" in printed
    report = json.loads(out.read_text())
    assert set(report["sources"]) == {s.name for s in MixtureConfig.load(sample_dir / "mixture.yaml").sources}
    for name, src in report["sources"].items():
        assert src["read"] > 0 and src["kept"] == src["selected"] > 0 and src["dropped"] == {}, name
    lengths = report["lengths"]
    assert lengths["count"] == report["samples"]
    assert lengths["min"] <= lengths["median"] <= lengths["p95"] <= lengths["max"]
    assert lengths["max"] >= 300  # long LLaVA descriptions
    assert 0.2 < report["supervised_fraction"] < 0.9
    assert len(report["examples"]) == 2 and all("</s>]]" in ex["text"] for ex in report["examples"])


def test_default_sample_is_big_enough_for_the_packing_benchmark(tmp_path, tiny_tokenizer):
    assert main(["data", "sample", "--out", str(tmp_path)]) == 0
    assert len(Mixture(MixtureConfig.load(tmp_path / "mixture.yaml"), tiny_tokenizer)) >= 2000


def test_inspect_reports_every_bad_input_reason(tmp_path, monkeypatch):
    cfg, outside = bad_input_dataset(tmp_path)
    opened: list[str] = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    out = tmp_path / "r.json"
    assert main(["data", "inspect", "--config", str(cfg), "--json", str(out), "--show", "0"]) == 0
    sources = json.loads(out.read_text())["sources"]
    reasons = set(sources["dolly"]["dropped"]) | set(sources["llava"]["dropped"])
    assert reasons == {"malformed_json", "missing_field", "empty_response", "too_long", "missing_image",
                       "corrupt_image", "path_escapes_root", "image_count_mismatch"}
    assert opened and not any(Path(p).resolve() == outside.resolve() for p in opened)


def test_inspect_fails_on_a_source_file_that_does_not_parse(tmp_path, capsys):
    root = screened_dataset(tmp_path, bad=False)
    cfg = write_config(root / "mixture.yaml", [
        {"name": "dolly", "type": "dolly", "path": "dolly.jsonl"},
        {"name": "llava", "type": "llava", "path": "llava.json", "image_root": "img"},
    ])
    text = (root / "llava.json").read_text()
    (root / "llava.json").write_text(text[:-1])  # the closing bracket is lost
    assert main(["data", "inspect", "--config", str(cfg), "--show", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmgpt data inspect: error: source 'llava': ")
    assert "llava.json: line 1 column" in err and "malformed_json" in err
