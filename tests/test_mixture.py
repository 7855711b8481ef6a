"""Seeded mixture: deterministic order and samples, counts and ratio respected, bad input counted,
image loading safe (never opens a path outside the image root)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import PIL.Image
import pytest
import yaml
import torch

from data_helpers import (bad_input_dataset, llava_record, make_image, screened_dataset, write_config, write_json,
                          write_lines)
from mmgpt.data.images import load_image
from mmgpt.image_transform import CLIP_MEAN, CLIP_STD, clip_transform
from mmgpt.data.inspection import inspect_mixture, length_stats
from mmgpt.configfile import ConfigError
from mmgpt.data.mixture import DataError, Mixture, MixtureConfig
from mmgpt.data.sources import RecordError


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """30 language-only (dolly) and 20 + 10 vision-language (llava) records with real images."""
    root = tmp_path_factory.mktemp("mix")
    write_lines(root / "dolly.jsonl", [
        json.dumps({"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.", "category": "x"})
        for i in range(30)
    ])
    for i in range(6):
        make_image(root / "img" / f"{i}.jpg", size=(20 + 4 * i, 24), color=(40 * i, 255 - 40 * i, 90))
    write_json(root / "llava_a.json", [
        llava_record(f"{i % 6}.jpg", f"<image>\nWhat is {i}?", f"It is {i}.") for i in range(20)])
    write_json(root / "llava_b.json", [
        llava_record(f"{i % 6}.jpg", f"Describe {i}.\n<image>", f"Thing {i}.", ("More?", "No."))
        for i in range(10)
    ])
    return root


def config(root: Path, seed: int = 42, ratio: float | None = None, samples=(None, None, None)) -> MixtureConfig:
    sources = [
        {"name": "dolly", "type": "dolly", "path": "dolly.jsonl", "sample": samples[0]},
        {"name": "a", "type": "llava", "path": "llava_a.json", "image_root": "img", "sample": samples[1]},
        {"name": "b", "type": "llava", "path": "llava_b.json", "image_root": "img", "sample": samples[2]},
    ]
    path = write_config(root / f"cfg_{seed}_{ratio}_{samples}.yaml", sources, seed=seed,
                        language_vl_ratio=ratio, image_size=16)
    return MixtureConfig.load(path)


def test_config_yaml_and_json_resolve_relative_paths(small_dataset):
    cfg = config(small_dataset, samples=("all", 5, None))
    assert cfg.sources[0].path == str(small_dataset / "dolly.jsonl")
    assert cfg.sources[1].image_root == str(small_dataset / "img")
    assert [s.sample for s in cfg.sources] == [None, 5, None]
    as_json = small_dataset / "sub" / "cfg.json"
    as_json.parent.mkdir(exist_ok=True)
    as_json.write_text(json.dumps({"sources": [{"name": "d", "type": "dolly", "path": "../dolly.jsonl"}]}))
    assert MixtureConfig.load(as_json).sources[0].path == str(small_dataset / "dolly.jsonl")
    as_json.write_text(json.dumps({"sources": [{"name": "d", "type": "dolly", "path": "x", "smaple": 3}]}))
    with pytest.raises(ValueError, match=r"cfg.json: sources\[0\].*smaple"):
        MixtureConfig.load(as_json)
    as_json.write_text(json.dumps({"sources": [{"name": "d", "type": "dolly_v2", "path": "x"}]}))
    with pytest.raises(ValueError, match="unknown type 'dolly_v2'"):
        MixtureConfig.load(as_json)
    as_json.write_text(json.dumps({"sources": [{"name": "o", "type": "ocrvqa", "path": "x",
                                                "options": {"pair": "one"}}]}))
    with pytest.raises(ValueError, match="cfg.json: .*'o': bad options.*pair"):
        MixtureConfig.load(as_json)


def _digest(mix: Mixture) -> list:
    out = []
    for i in range(len(mix)):
        s = mix.load(i)
        out.append((s.index, s.source, s.input_ids, s.labels, [img.tolist() for img in s.images]))
    return out


def test_same_seed_same_samples_other_seed_other_order(small_dataset, tiny_tokenizer):
    first = _digest(Mixture(config(small_dataset, seed=3), tiny_tokenizer))
    assert first == _digest(Mixture(config(small_dataset, seed=3), tiny_tokenizer))
    assert [d[0] for d in first] == list(range(60))
    other = _digest(Mixture(config(small_dataset, seed=4), tiny_tokenizer))
    assert [d[2] for d in other] != [d[2] for d in first]  # another order...
    assert sorted(str(d[1:]) for d in other) == sorted(str(d[1:]) for d in first)  # ...of the same samples


def test_order_is_identical_in_another_process(small_dataset, tiny_tokenizer):
    cfg_path = small_dataset / "proc.yaml"
    cfg_path.write_text(json.dumps(config(small_dataset, seed=9, samples=(12, 7, None)).to_dict()))
    code = (
        "import json,sys\n"
        "from mmgpt.data.mixture import Mixture, MixtureConfig\n"
        "from mmgpt.tokenizer import load_tokenizer, TINY_TOKENIZER_DIR\n"
        "m = Mixture(MixtureConfig.load(sys.argv[1]), load_tokenizer(TINY_TOKENIZER_DIR))\n"
        "print(json.dumps([m.conversation(i).origin for i in range(len(m))]))\n"
    )
    env = {"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, str(cfg_path)], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    here = Mixture(MixtureConfig.load(cfg_path), tiny_tokenizer)
    assert json.loads(out.stdout) == [here.conversation(i).origin for i in range(len(here))]


def test_sample_counts_respected(small_dataset, tiny_tokenizer):
    mix = Mixture(config(small_dataset, samples=(12, 7, 100)), tiny_tokenizer)
    by_source = Counter(mix.conversation(i).source for i in range(len(mix)))
    assert by_source == {"dolly": 12, "a": 7, "b": 10}  # b asks for more than it has: all of it
    report = mix.report.to_dict()["sources"]
    assert {k: (v["read"], v["selected"]) for k, v in report.items()} == {
        "dolly": (30, 12), "a": (20, 7), "b": (10, 10)}
    origins = {mix.conversation(i).origin for i in range(len(mix))}
    assert len(origins) == len(mix)  # drawn without replacement
    again = Mixture(config(small_dataset, samples=(12, 7, 100)), tiny_tokenizer)
    assert origins == {again.conversation(i).origin for i in range(len(again))}


@pytest.mark.parametrize("ratio, expected", [(1.0, (30, 30)), (0.5, (15, 30)), (2.0, (30, 15)), (None, (30, 30))])
def test_language_vl_ratio(small_dataset, tiny_tokenizer, ratio, expected):
    mix = Mixture(config(small_dataset, ratio=ratio), tiny_tokenizer)
    vl = sum(bool(mix.conversation(i).images) for i in range(len(mix)))
    assert (len(mix) - vl, vl) == expected


def test_ratio_downsamples_the_larger_side(small_dataset, tiny_tokenizer):
    mix = Mixture(config(small_dataset, ratio=1.0, samples=(None, None, 4)), tiny_tokenizer)
    sources = Counter(mix.conversation(i).source for i in range(len(mix)))
    assert sources["a"] + sources["b"] == 24 and sources["dolly"] == 24


def test_loaded_sample_fields(small_dataset, tiny_tokenizer):
    cfg = config(small_dataset)  # its mixture says image_size 16: a model of another size refuses it
    with pytest.raises(ConfigError, match="mixture image_size 16 differs from the model's CLIP input size 24"):
        Mixture(cfg, tiny_tokenizer, image_size=24)
    cfg.image_size = None  # the model's size, then
    mix = Mixture(cfg, tiny_tokenizer, image_size=24)
    for i in range(len(mix)):
        s = mix.load(i)
        conv = mix.conversation(i)
        assert s.index == i and s.source == conv.source and s.is_vl == bool(conv.images)
        assert len(s.images) == len(conv.images) and all(img.shape == (3, 24, 24) for img in s.images)
    assert {k: v["kept"] for k, v in mix.report.to_dict()["sources"].items()} == {"dolly": 30, "a": 20, "b": 10}


def test_clip_transform_equals_open_clip_preprocess(tmp_path):
    """Same pixels as open_clip's eval preprocessing of the RGB image (what OpenFlamingo used)."""
    from open_clip.transform import image_transform

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (30, 47, 3), generator=gen, dtype=torch.uint8).numpy()
    PIL.Image.fromarray(pixels).convert("LA").save(tmp_path / "x.png")  # grey + alpha: needs RGB
    out = load_image(tmp_path, "x.png", clip_transform(16))
    with PIL.Image.open(tmp_path / "x.png") as img:
        expected = image_transform(16, is_train=False)(img.convert("RGB"))
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path PIL.Image.open is asked for during the test."""
    paths: list[str] = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: paths.append(str(fp)) or real_open(fp, *a, **k))
    return paths


def test_path_escaping_root_is_never_opened(tmp_path, opened):
    root = tmp_path / "root"
    make_image(root / "inside.jpg")
    outside = make_image(tmp_path / "outside.jpg")
    (root / "link.jpg").symlink_to(outside)
    transform = clip_transform(8)
    for rel in ("../outside.jpg", str(outside), "sub/../../outside.jpg", "link.jpg"):
        assert load_image(root, rel, transform) == "path_escapes_root", rel
    assert opened == []
    assert isinstance(load_image(root, "inside.jpg", transform), torch.Tensor) and len(opened) == 1


def test_bad_inputs_are_counted_by_reason(tmp_path, tiny_tokenizer, opened):
    cfg_path, outside = bad_input_dataset(tmp_path)
    report = inspect_mixture(Mixture(MixtureConfig.load(cfg_path), tiny_tokenizer), show=0)
    dolly, llava = report["sources"]["dolly"], report["sources"]["llava"]
    assert (dolly["read"], dolly["kept"]) == (6, 2)
    assert dolly["dropped"] == {"empty_response": 1, "malformed_json": 1, "missing_field": 1, "too_long": 1}
    assert (llava["read"], llava["kept"]) == (6, 1)
    assert llava["dropped"] == {"corrupt_image": 1, "image_count_mismatch": 1, "missing_image": 1,
                                "path_escapes_root": 2}
    assert any("dolly.jsonl: line 2: malformed_json" in e for e in dolly["errors"])
    assert any("'response'" in e and "line 3" in e for e in dolly["errors"])
    assert str(outside) not in opened and all("outside" not in p for p in opened)


def test_construction_screens_images_without_opening_any(tmp_path, tiny_tokenizer, opened, monkeypatch):
    cfg_path, _ = bad_input_dataset(tmp_path)
    files: list[str] = []
    real_open = open
    with monkeypatch.context() as patch:
        patch.setattr("builtins.open", lambda f, *a, **k: files.append(str(f)) or real_open(f, *a, **k))
        mix = Mixture(MixtureConfig.load(cfg_path), tiny_tokenizer)
    assert opened == [] and not any(Path(f).suffix == ".jpg" for f in files)
    report = mix.report.to_dict()["sources"]
    assert report["llava"]["dropped"] == {"image_count_mismatch": 1, "missing_image": 1,
                                          "path_escapes_root": 2}  # before any load
    assert report["dolly"]["dropped"] == {"empty_response": 1, "malformed_json": 1, "missing_field": 1}
    assert (report["llava"]["selected"], report["dolly"]["selected"]) == (2, 3)
    assert any("llava.json record 3 " in e and "'../outside/secret.jpg'" in e for e in report["llava"]["errors"])


def _screened_run(root: Path, tokenizer, samples: tuple[int | None, int | None], ratio: float | None) -> Mixture:
    """The mixture of a screened_dataset, every sample loaded once (so `kept` is final)."""
    cfg = write_config(root / "mixture.yaml", [
        {"name": "dolly", "type": "dolly", "path": "dolly.jsonl", "sample": samples[0]},
        {"name": "llava", "type": "llava", "path": "llava.json", "image_root": "img", "sample": samples[1]},
    ], language_vl_ratio=ratio, image_size=16)
    mix = Mixture(MixtureConfig.load(cfg), tokenizer)
    for i in range(len(mix)):
        mix.load(i)
    return mix


@pytest.mark.parametrize("ratio, expected", [(None, (25, 18)), (1.0, (18, 18)), (0.5, (9, 18))])
def test_bad_records_do_not_change_what_is_kept(tmp_path, tiny_tokenizer, ratio, expected):
    """sample: and the ratio count usable records: injecting 3 bad ones adds 3 drops, nothing else."""
    clean, dirty = (_screened_run(screened_dataset(tmp_path / name, bad=name == "dirty"), tiny_tokenizer,
                                  (25, 18), ratio) for name in ("clean", "dirty"))
    for mix in (clean, dirty):
        assert {n: (r.selected, r.kept) for n, r in mix.report.sources.items()} == {
            "dolly": (expected[0],) * 2, "llava": (expected[1],) * 2}
    assert {n: r.read - clean.report.sources[n].read for n, r in dirty.report.sources.items()} == {
        "dolly": 1, "llava": 2}
    assert all(not r.dropped for r in clean.report.sources.values())
    dolly, llava = dirty.report.sources["dolly"], dirty.report.sources["llava"]
    assert dolly.dropped == {"malformed_json": 1} and llava.dropped == {"path_escapes_root": 1, "missing_image": 1}
    assert any("dolly.jsonl: line 11: malformed_json" in e for e in dolly.errors)
    assert any("llava.json record 6 " in e and "'missing.jpg'" in e for e in llava.errors)
    # The very same records, in the same order (origins differ: the bad ones shift positions).
    content = [[(c.rounds, c.images) for c in map(mix.conversation, range(len(mix)))] for mix in (clean, dirty)]
    assert content[0] == content[1]


def test_sample_of_every_usable_record_keeps_them_all(tmp_path, tiny_tokenizer):
    mix = _screened_run(screened_dataset(tmp_path, bad=True), tiny_tokenizer, (30, 20), None)
    assert {n: (r.read, r.selected, r.kept) for n, r in mix.report.sources.items()} == {
        "dolly": (31, 30, 30), "llava": (22, 20, 20)}


def test_report_counts_each_index_once(tmp_path, tiny_tokenizer):
    cfg_path, _ = bad_input_dataset(tmp_path)
    mix = Mixture(MixtureConfig.load(cfg_path), tiny_tokenizer)
    for _ in range(2):
        for i in range(len(mix)):
            mix.load(i)
    assert mix.report.to_dict()["sources"]["llava"]["dropped"]["path_escapes_root"] == 2
    assert mix.report.to_dict()["sources"]["dolly"]["kept"] == 2


def test_on_error_raise(tmp_path, tiny_tokenizer):
    cfg_path, _ = bad_input_dataset(tmp_path)
    cfg = MixtureConfig.load(cfg_path)
    cfg.on_error = "raise"
    with pytest.raises(RecordError, match=r"dolly.jsonl: line 2: malformed_json"):
        Mixture(cfg, tiny_tokenizer)
    cfg.sources = cfg.sources[1:]
    with pytest.raises(RecordError, match=r"llava.json: record 5: .*image_count_mismatch"):
        Mixture(cfg, tiny_tokenizer)  # a record error (the reader's), like malformed JSON
    records = json.loads((tmp_path / "llava.json").read_text())
    write_json(tmp_path / "llava.json", records[:5])
    with pytest.raises(DataError, match=r"llava.json record 1 .*'missing.jpg'.*missing_image"):
        Mixture(cfg, tiny_tokenizer)  # found when the mixture is built, before sampling
    write_json(tmp_path / "llava.json", [llava_record("corrupt.jpg", "<image>\nWhat is shown?", "Noise.")])
    mix = Mixture(cfg, tiny_tokenizer)
    with pytest.raises(DataError, match=r"llava.json record 0 .*'corrupt.jpg'.*corrupt_image"):
        mix.load(0)  # only decoding finds this one


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_a_source_file_that_does_not_parse_stops_the_mixture(tmp_path, tiny_tokenizer, on_error):
    """Whatever on_error says: training on, silently without one of the sources, is worse."""
    root = screened_dataset(tmp_path, bad=False)
    cfg = MixtureConfig.load(write_config(root / "mixture.yaml", [
        {"name": "dolly", "type": "dolly", "path": "dolly.jsonl"},
        {"name": "llava", "type": "llava", "path": "llava.json", "image_root": "img"},
    ], on_error=on_error, language_vl_ratio=None))
    llava = (root / "llava.json").read_bytes()
    (root / "llava.json").write_bytes(llava[: len(llava) // 2])
    with pytest.raises(DataError, match=r"^source 'llava': \S+llava.json: line 1 column \d+: malformed_json: [^\n]+$"):
        Mixture(cfg, tiny_tokenizer)
    (root / "llava.json").write_bytes(b"\xef\xbb\xbf" + llava)  # a BOM is fine
    assert len(Mixture(cfg, tiny_tokenizer)) == 50
    records = [json.loads(line) for line in (root / "dolly.jsonl").read_text().splitlines()]
    (root / "dolly.jsonl").write_text(json.dumps(records, indent=1))  # a JSON list where lines are expected
    with pytest.raises(DataError, match=r"source 'dolly': no record parses, e.g. \S+dolly.jsonl: line 1: "):
        Mixture(cfg, tiny_tokenizer)


def test_vl_source_without_image_root_is_a_config_error(small_dataset, tiny_tokenizer):
    cfg = config(small_dataset)
    cfg.sources[1].image_root = None
    with pytest.raises(ValueError, match="'a'.*no image_root"):
        Mixture(cfg, tiny_tokenizer)


def test_length_stats():
    stats = length_stats(list(range(1, 101)))
    assert (stats["min"], stats["median"], stats["p95"], stats["max"]) == (1, 50.5, 95, 100)
    assert sum(stats["histogram"].values()) == 100 and stats["histogram"]["65-128"] == 36


@pytest.mark.parametrize("change, message", [
    ({"seed": "abc"}, r"seed: expected an integer"),
    ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"sources": [{"name": "d", "type": "dolly", "path": "d.jsonl", "smaple": 5}]}, r"sources\[0\]: unknown key"),
    ({"sources": [{"name": "d", "type": "dolly", "path": "d.jsonl", "sample": 1.5}]}, r"sources\[0\]: sample"),
])
def test_mixture_files_are_typed_like_every_config(tmp_path, change, message):
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"name": "d", "type": "dolly", "path": "d.jsonl"}], **change}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: .*{message}"):
        MixtureConfig.load(path)


def _origins(mix: Mixture) -> list[str]:
    return [mix.conversation(i).origin for i in range(len(mix))]


@pytest.mark.parametrize("holdout, expected", [(3, {"dolly": 3, "a": 3, "b": 3}), (0.2, {"dolly": 6, "a": 4, "b": 2}),
                                               (0.01, {"dolly": 1, "a": 1, "b": 1})])
def test_holdout_is_seeded_stable_and_never_in_the_epoch(small_dataset, tiny_tokenizer, holdout, expected):
    """The same records are held out whatever `sample:` and the ratio select, none of them is
    trained on, and the data report records how many."""
    held = None
    for samples, ratio in [((None, None, None), None), ((12, 7, 100), 1.0), ((5, None, 2), 0.5), ((None, 3, 4), 2.0)]:
        mix = Mixture(config(small_dataset, ratio=ratio, samples=samples), tiny_tokenizer, holdout=holdout)
        view = mix.holdout()
        assert held is None or _origins(view) == held
        held = _origins(view)
        assert not set(held) & set(_origins(mix))
        assert Counter(view.conversation(i).source for i in range(len(view))) == expected
        assert {k: v["held_out"] for k, v in mix.report.to_dict()["sources"].items()} == expected
        assert all(view.load(i).index == i for i in range(len(view)))
        assert sum(r.kept for r in mix.report.sources.values()) == 0  # loading held-out data is not training's
    assert held != _origins(Mixture(config(small_dataset, seed=7), tiny_tokenizer, holdout=holdout).holdout())
    without = Mixture(config(small_dataset, samples=(12, 7, 100)), tiny_tokenizer)
    assert len(without.holdout()) == 0 and without.report.to_dict()["sources"]["a"]["held_out"] == 0
