"""Helpers shared by the data tests: files in the real formats, stand-in images, bad inputs."""
from __future__ import annotations

import json
import struct
import zlib
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


def pixel_bomb_png(path: Path, side: int = 13000) -> Path:
    """A valid 1-bit PNG of side x side black pixels (169 megapixels at 13000) in about 20 KB,
    written without ever holding the pixels: decoding it in full takes hundreds of MB."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    blocks, rest = divmod(side, 1000)
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row * 1000) for _ in range(blocks)] + [z.compress(row * rest), z.flush()])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _generic_record(images: list[str], question: str, answer: str) -> dict[str, Any]:
    markers = "".join("<image>\n" for _ in images)
    return {"image": images, "conversations": [{"from": "human", "value": markers + question},
                                               {"from": "gpt", "value": answer}]}


def _aokvqa_record(image_id: int, question: str) -> dict[str, Any]:
    return {"question_id": f"q{image_id}", "image_id": image_id, "question": question, "split": "train",
            "choices": ["red", "blue", "green", "white"], "correct_choice_idx": 1,
            "rationales": ["The sky is blue.", "It is daytime."]}


# What hostile_dataset(hostile=True) adds, by source and reason: each record dropped exactly once.
HOSTILE_DROPS = {
    "dolly": {"bad_text": 1, "number_too_long": 1, "nesting_too_deep": 1},
    "mine": {"bad_image_path": 3, "too_many_images": 1, "image_too_large": 1},
    "aokvqa": {"bad_image_path": 1, "empty_instruction": 1},
}
HOSTILE_MAX_IMAGES = 2  # max_images_per_row the hostile mixture is built for


def hostile_dataset(root: Path, hostile: bool, dolly: int = 8, mine: int = 4, aokvqa: int = 3) -> Path:
    """Good records of three sources (dolly JSON lines, generic JSON lines with images, A-OKVQA JSON
    list); with `hostile`, the valid-JSON records that used to crash a run are mixed in between
    them (HOSTILE_DROPS). Returns the mixture config; language_vl_ratio is off, so the good records
    kept are the same with or without the hostile ones.
    """
    lines = [json.dumps({"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.",
                         "category": "x"}) for i in range(dolly)]
    images = root / "img"
    for i in range(4):
        make_image(images / f"{i}.jpg", color=(60 * i, 90, 200 - 40 * i))
    generic = [_generic_record([f"{i % 4}.jpg"], f"What is {i}?", f"It is {i}.") for i in range(mine)]
    generic.append(_generic_record(["0.jpg", "1.jpg"], "Compare them.", "Same size."))  # at the limit
    coco = root / "coco"
    for i in range(1, aokvqa + 1):
        make_image(coco / "train2017" / f"{i:012d}.jpg", color=(20, 40 * i, 90))
    questions = [_aokvqa_record(i, f"What colour is thing {i}?") for i in range(1, aokvqa + 1)]
    if hostile:
        lines[2:2] = [
            json.dumps({"instruction": "Say it.", "context": "", "response": "A lone \ud800 surrogate."}),
            '{"instruction": ' + "7" * 5000 + ', "context": "", "response": "Big."}',
            '{"instruction": "Deep?", "context": ' + "[" * 100_000 + "]" * 100_000 + ', "response": "Yes."}',
        ]
        (images / "loop").symlink_to("loop")
        pixel_bomb_png(images / "bomb.png")
        generic[1:1] = [
            _generic_record(["x\ud800.jpg"], "What is it?", "A surrogate."),
            _generic_record(["loop/0.jpg"], "What is it?", "A loop."),
            _generic_record(["n" * 300 + ".jpg"], "What is it?", "A long name."),
            _generic_record(["0.jpg", "1.jpg", "2.jpg"], "Compare all.", "Too many."),
            _generic_record(["bomb.png"], "What is it?", "A bomb."),
        ]
        questions[1:1] = [_aokvqa_record(10**300, "What colour?"), _aokvqa_record(3, "  ")]
    write_lines(root / "dolly.jsonl", lines)
    write_lines(root / "mine.jsonl", [json.dumps(r) for r in generic])
    write_json(root / "aokvqa.json", questions)
    return write_config(
        root / "mixture.yaml",
        [
            {"name": "dolly", "type": "dolly", "path": "dolly.jsonl"},
            {"name": "mine", "type": "generic", "path": "mine.jsonl", "image_root": "img"},
            {"name": "aokvqa", "type": "aokvqa", "path": "aokvqa.json", "image_root": "coco"},
        ],
        max_length=256,
        language_vl_ratio=None,
        image_size=32,  # the tiny preset's: this mixture is also trained on
    )
