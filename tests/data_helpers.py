"""Helpers shared by the data tests: files in the real formats, stand-in images, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

# Every file of shared/real-samples and the reader type that must parse it.
REAL_SAMPLE_TYPES = {
    "dolly.jsonl": "dolly",
    "alpaca_gpt4.json": "alpaca",
    "baize_quora.json": "baize",
    "llava_detail_23k.json": "llava",
    "llava_complex_reasoning_77k.json": "llava",
    "llava_conversation_58k.json": "llava",
    "minigpt4_filter_cap.json": "minigpt4",
    "aokvqa_train.json": "aokvqa",
    "coco_karpathy_train.json": "coco_caption",
    "coco_captions_train2017.json": "coco_caption",
    "ocrvqa_dataset.json": "ocrvqa",
}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_image(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def write_config(path: Path, sources: list[dict[str, Any]], **top: Any) -> Path:
    return write_lines(path, [yaml.safe_dump({**top, "sources": sources}, sort_keys=False)])


def llava_record(image: str, first: str, answer: str, *more: tuple[str, str]) -> dict[str, Any]:
    turns = [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]
    for q, a in more:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": Path(image).stem, "image": image, "conversations": turns}


def bad_input_dataset(root: Path) -> tuple[Path, Path]:
    """A mixture where every bad-input case occurs once; returns (config, outside image).

    dolly: 2 good, a malformed JSON line, a record without `response`, an empty response and one
    far longer than max_length. llava: 1 good, missing image, corrupt image, `../` escape,
    absolute-path escape (both point at a REAL image outside the root) and an extra `<image>`.
    """
    good = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}
    long_answer = " ".join(["The answer keeps going with many more words."] * 60)
    write_lines(root / "dolly.jsonl", [
        json.dumps(good),
        '{"instruction": "broken", "response": ',
        json.dumps({"instruction": "No answer here.", "context": ""}),
        json.dumps({**good, "response": "   "}),
        json.dumps({**good, "response": long_answer}),
        json.dumps({**good, "instruction": "Name another colour."}),
    ])
    images = root / "images"
    make_image(images / "good.jpg")
    corrupt = images / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    outside = make_image(root / "outside" / "secret.jpg")
    write_json(root / "llava.json", [
        llava_record("good.jpg", "What is shown?\n<image>", "A red square."),
        llava_record("missing.jpg", "<image>\nWhat is shown?", "Nothing."),
        llava_record("corrupt.jpg", "<image>\nWhat is shown?", "Noise."),
        llava_record("../outside/secret.jpg", "<image>\nWhat is shown?", "A secret."),
        llava_record(str(outside), "<image>\nWhat is shown?", "A secret."),
        llava_record("good.jpg", "<image>\nWhat is shown?", "A square.", ("And here <image> too?", "Yes.")),
    ])
    config = write_config(
        root / "mixture.yaml",
        [
            {"name": "dolly", "type": "dolly", "path": "dolly.jsonl"},
            {"name": "llava", "type": "llava", "path": "llava.json", "image_root": "images"},
        ],
        max_length=160,
        language_vl_ratio=None,
        image_size=16,
    )
    return config, outside


def screened_dataset(root: Path, bad: bool) -> Path:
    """30 dolly and 20 llava records, all usable; with `bad`, a malformed dolly line, a `../` image
    path (to a real file) and a missing image are injected among them. Returns `root`.

    The bad records sit mid-file, so they shift the positions of the good records after them.
    """
    lines = [json.dumps({"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.",
                         "category": "x"}) for i in range(30)]
    for i in range(4):
        make_image(root / "img" / f"{i}.jpg", color=(60 * i, 90, 200 - 40 * i))
    records = [llava_record(f"{i % 4}.jpg", f"<image>\nWhat is {i}?", f"It is {i}.") for i in range(20)]
    if bad:
        lines.insert(10, '{"instruction": "broken", ')
        make_image(root / "outside.jpg")
        records[5:5] = [llava_record("../outside.jpg", "<image>\nWhat is it?", "A secret."),
                        llava_record("missing.jpg", "<image>\nWhat is it?", "Nothing.")]
    write_lines(root / "dolly.jsonl", lines)
    write_json(root / "llava.json", records)
    return root
