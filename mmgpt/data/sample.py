"""`mmgpt data sample`: a small dataset in every source's ORIGINAL on-disk layout, plus mixture.yaml.

Text is generated from templates with a seeded RNG (so the same seed gives byte-identical files)
with a realistic length mix: long LLaVA descriptions, short captions, Dolly/Alpaca of varying
length, multi-round LLaVA and OCR-VQA dialogues. Images are tiny deterministic JPEGs (coloured
shapes) under the file names the records use. On top of that budget comes the visual task
(`mmgpt.data.shapes`: questions whose answers only the picture gives), four times as many records,
plus its held-out file. Used by the demo, the packing benchmark and anyone trying the pipeline.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from PIL import Image, ImageDraw

from mmgpt.data import shapes

# Share of the record budget per file (language-only about 40 %, as in the paper's mixture).
SHARES = {
    "dolly": 0.20,
    "alpaca": 0.20,
    "llava_detail": 0.06,
    "llava_complex": 0.08,
    "llava_conversation": 0.10,
    "minigpt4": 0.06,
    "aokvqa": 0.10,
    "coco_karpathy": 0.05,
    "coco_captions": 0.05,
    "ocrvqa": 0.05,
    "generic": 0.05,
}
DEFAULT_RECORDS = 4000
# The visual task's pictures per record of the budget: training (shapes/shapes_train.json) and
# held-out (shapes/shapes_val.json).
SHAPES_PER_RECORD, SHAPES_VAL_SHARE = 4, 0.1

ADJECTIVES = (
    "red blue green small large old young wooden bright dark busy quiet crowded empty white black "
    "tall narrow wide sunny"
).split()
NOUNS = (
    "man woman dog cat bus train table kitchen street park bicycle kite laptop plate bridge river "
    "building truck umbrella horse"
).split()
PLACES = "street park kitchen beach field office station market garden plaza airport river bank".split()
VERBS = (
    "is standing near|is sitting on|is walking along|is parked beside|is resting under|is looking at|"
    "is holding|is crossing"
).split("|")
TOPICS = (
    "history|cooking|physics|gardening|music|economics|travel|programming|sports|health|astronomy|literature"
).split("|")
CONNECTIVES = (
    "In addition,|However,|For example,|As a result,|Meanwhile,|Overall,|In contrast,|Notably,"
).split("|")
QUESTIONS = (
    "What is {a} {n} doing in the image?|How many {n}s can be seen?|What color is the {n}?|"
    "Where is the {n} located?|Why might the {n} be there?|What is the weather like in the scene?"
).split("|")


class _Writer:
    """Seeded text generator: everything derives from one random.Random."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, seq: list[str]) -> str:
        return self.rng.choice(seq)

    def sentence(self) -> str:
        r = self.rng
        body = f"the {self.pick(ADJECTIVES)} {self.pick(NOUNS)} {self.pick(VERBS)} the {self.pick(NOUNS)}"
        if r.random() < 0.5:
            body += f" in the {self.pick(ADJECTIVES)} {self.pick(PLACES)}"
        if r.random() < 0.3:
            return f"{self.pick(CONNECTIVES)} {body}."
        return body[0].upper() + body[1:] + "."

    def paragraph(self, lo: int, hi: int) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(lo, hi)))

    def text(self, lo: int, hi: int) -> str:
        """lo..hi sentences, split into paragraphs or a numbered list now and then."""
        n = self.rng.randint(lo, hi)
        if n >= 6 and self.rng.random() < 0.3:
            return "\n".join(f"{k + 1}. {self.sentence()}" for k in range(n))
        paras, left = [], n
        while left > 0:
            k = min(left, self.rng.randint(2, 5))
            paras.append(" ".join(self.sentence() for _ in range(k)))
            left -= k
        return "\n\n".join(paras)

    def question(self) -> str:
        noun = self.pick(NOUNS)
        return self.pick(QUESTIONS).format(a="the", n=noun)

    def instruction(self) -> str:
        r = self.rng
        kind = r.randrange(4)
        if kind == 0:
            return f"Explain the basics of {self.pick(TOPICS)} to a beginner."
        if kind == 1:
            return f"Write a short story about a {self.pick(ADJECTIVES)} {self.pick(NOUNS)}."
        if kind == 2:
            return f"Summarize the following text about {self.pick(TOPICS)}."
        return f"Give {r.randint(2, 5)} tips for {self.pick(TOPICS)}."

    def caption(self) -> str:
        s = f"A {self.pick(ADJECTIVES)} {self.pick(NOUNS)} {self.pick(VERBS)} a {self.pick(NOUNS)}"
        return s + (f" in the {self.pick(PLACES)}." if self.rng.random() < 0.6 else ".")


def _draw_image(path: Path, rng: random.Random) -> None:
    """A tiny JPEG: coloured background with a rectangle and an ellipse, non-square on purpose."""
    w, h = rng.randint(32, 64), rng.randint(32, 64)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    img = Image.new("RGB", (w, h), colour())
    draw = ImageDraw.Draw(img)
    draw.rectangle([rng.randrange(w // 2), rng.randrange(h // 2), w - 1, h - 1], fill=colour())
    draw.ellipse([rng.randrange(w // 2), rng.randrange(h // 2), w // 2 + 8, h // 2 + 8], fill=colour())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=85)


def _dump(path: Path, data: Any, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _llava_turns(w: _Writer, rounds: list[tuple[str, str]], image: bool = True) -> list[dict[str, str]]:
    """LLaVA turns with `<image>` before or after the first question, as in the real files."""
    turns = []
    for k, (q, a) in enumerate(rounds):
        if k == 0 and image:
            q = f"<image>\n{q}" if w.rng.random() < 0.5 else f"{q}\n<image>"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


def _train2017(image_id: int) -> str:
    """COCO train2017's file name of an image id."""
    return f"{image_id:012d}.jpg"


@dataclass
class _Draw:
    """What every source's writer shares. They all draw from the one RNG, so they run in a fixed
    order (`WRITERS`): the same seed gives byte-identical files."""

    out: Path
    rng: random.Random
    w: _Writer
    count: dict[str, int]  # records per file (SHARES of the budget)
    coco_ids: list[int]  # the COCO train2017 images the VL records refer to


def _write_dolly(d: _Draw) -> None:
    dolly = []
    for _ in range(d.count["dolly"]):
        has_context = d.rng.random() < 0.4
        dolly.append({
            "instruction": f"What does the passage say about the {d.w.pick(NOUNS)}?" if has_context
            else d.w.instruction(),
            "context": d.w.text(3, 10) if has_context else "",
            "response": d.w.text(1, 2) if d.rng.random() < 0.5 else d.w.text(3, 14),
            "category": d.rng.choice(["closed_qa", "open_qa", "brainstorming", "creative_writing", "summarization"]),
        })
    _dump(d.out / "dolly" / "databricks-dolly-15k.jsonl", dolly, lines=True)


def _write_alpaca(d: _Draw) -> None:
    alpaca = [
        {"instruction": d.w.instruction(), "input": d.w.paragraph(1, 4) if d.rng.random() < 0.4 else "",
         "output": d.w.text(1, 3) if d.rng.random() < 0.4 else d.w.text(4, 16)}
        for _ in range(d.count["alpaca"])
    ]
    _dump(d.out / "alpaca_gpt4" / "alpaca_gpt4_data.json", alpaca)


def _write_llava(d: _Draw) -> None:
    """The three LLaVA files: detail (one long answer), complex reasoning, multi-round conversation."""
    w = d.w

    def llava(n: int, make_rounds: Callable[[], list[tuple[str, str]]]) -> list[dict]:
        recs = []
        for _ in range(n):
            image_id = d.rng.choice(d.coco_ids)
            recs.append({"id": f"{image_id:012d}", "image": _train2017(image_id),
                         "conversations": _llava_turns(w, make_rounds())})
        return recs

    llava_dir = d.out / "llava"
    _dump(llava_dir / "detail_23k.json", llava(d.count["llava_detail"], lambda: [
        ("Describe the following image in detail.", w.text(10, 18))]))
    _dump(llava_dir / "complex_reasoning_77k.json", llava(d.count["llava_complex"], lambda: [
        (w.question(), w.text(4, 10))]))
    _dump(llava_dir / "conversation_58k.json", llava(d.count["llava_conversation"], lambda: [
        (w.question(), w.text(1, 4)) for _ in range(d.rng.randint(2, 5))]))


def _write_minigpt4(d: _Draw) -> None:
    minigpt4 = [{"image_id": str(k + 2), "caption": d.w.text(2, 5).replace("\n\n", " ")}
                for k in range(d.count["minigpt4"])]
    _dump(d.out / "cc_sbu_align" / "filter_cap.json", {"annotations": minigpt4})
    for rec in minigpt4:
        _draw_image(d.out / "cc_sbu_align" / "image" / f"{rec['image_id']}.jpg", d.rng)


def _write_aokvqa(d: _Draw) -> None:
    rng, aokvqa = d.rng, []
    for _ in range(d.count["aokvqa"]):
        choices = [rng.choice(NOUNS) for _ in range(4)]
        aokvqa.append({
            "split": "train", "image_id": rng.choice(d.coco_ids),
            "question_id": f"q{rng.getrandbits(48):x}",
            "question": d.w.question(), "choices": choices, "correct_choice_idx": rng.randrange(4),
            "direct_answers": [rng.choice(choices) for _ in range(10)], "difficult_direct_answer": False,
            "rationales": [d.w.sentence() for _ in range(3)],
        })
    _dump(d.out / "aokvqa" / "aokvqa_v1p0_train.json", aokvqa)


def _write_coco_karpathy(d: _Draw) -> None:
    """Karpathy's split: captions of val2014 images (their own image files)."""
    rng = d.rng
    val_ids = rng.sample(range(1, 581930), max(2, d.count["coco_karpathy"] // 5))
    karpathy = [{"caption": d.w.caption() + rng.choice(["", " "]),
                 "image": f"val2014/COCO_val2014_{i:012d}.jpg", "image_id": f"coco_{i}"}
                for i in (rng.choice(val_ids) for _ in range(d.count["coco_karpathy"]))]
    _dump(d.out / "coco" / "annotations" / "coco_karpathy_train.json", karpathy)
    for i in val_ids:
        _draw_image(d.out / "coco" / "images" / "val2014" / f"COCO_val2014_{i:012d}.jpg", rng)


def _write_coco_captions(d: _Draw) -> None:
    """captions_train2017.json, then every train2017 image the VL records use."""
    rng = d.rng
    caption_images = rng.sample(d.coco_ids, min(len(d.coco_ids), d.count["coco_captions"]))
    annotations = [{"image_id": i, "id": rng.getrandbits(31), "caption": d.w.caption()}
                   for i in caption_images for _ in range(5)]
    rng.shuffle(annotations)  # one image's captions are not contiguous in the real file
    _dump(d.out / "coco" / "annotations" / "captions_train2017.json", {
        "info": {"description": "mmgpt sample"}, "licenses": [],
        "images": [{"id": i, "file_name": _train2017(i), "height": 48, "width": 48} for i in caption_images],
        "annotations": annotations,
    })
    for i in d.coco_ids:
        _draw_image(d.out / "coco" / "images" / "train2017" / _train2017(i), rng)


def _write_ocrvqa(d: _Draw) -> None:
    rng, w, ocrvqa = d.rng, d.w, {}
    for _ in range(d.count["ocrvqa"]):
        key = str(rng.randrange(10**8, 10**10))
        title = f"The {w.pick(ADJECTIVES).title()} {w.pick(NOUNS).title()}"
        author = f"{rng.choice(['Ann', 'Bo', 'Carl', 'Dana'])} {rng.choice(['Lee', 'Smith', 'Kim'])}"
        genre = w.pick(TOPICS).title()
        ocrvqa[key] = {
            "imageURL": f"http://ecx.images-amazon.com/images/I/{key}L.jpg",
            "questions": ["Who wrote this book?", "What is the title of this book?",
                          "What is the genre of this book?", f"Is this a {w.pick(TOPICS)} book?"],
            "answers": [author, title, genre, rng.choice(["Yes", "No"])],
            "title": title, "authorName": author, "genre": genre, "split": rng.choice([1, 1, 1, 2, 3]),
        }
        _draw_image(d.out / "ocrvqa" / "images" / f"{key}.jpg", rng)
    _dump(d.out / "ocrvqa" / "dataset.json", ocrvqa)


def _write_generic(d: _Draw) -> None:
    generic = []
    for _ in range(d.count["generic"]):
        rounds = [(d.w.question(), d.w.text(1, 3)) for _ in range(d.rng.randint(1, 3))]
        with_image = d.rng.random() < 0.5  # the generic format mixes VL and language-only records
        rec: dict[str, Any] = {"conversations": _llava_turns(d.w, rounds, image=with_image)}
        if with_image:
            rec["image"] = f"train2017/{_train2017(d.rng.choice(d.coco_ids))}"
        generic.append(rec)
    _dump(d.out / "my_data" / "conversations.jsonl", generic, lines=True)


WRITERS = (_write_dolly, _write_alpaca, _write_llava, _write_minigpt4, _write_aokvqa, _write_coco_karpathy,
           _write_coco_captions, _write_ocrvqa, _write_generic)


def write_sample(out: Path, records: int = DEFAULT_RECORDS, seed: int = 0, image_size: int = 32,
                 max_length: int = 2048) -> Path:
    """Write the dataset under `out` and return the path of `out/mixture.yaml`."""
    out = Path(out)
    rng = random.Random(seed)
    count = {k: max(2, round(v * records)) for k, v in SHARES.items()}
    draw = _Draw(out, rng, _Writer(rng), count, coco_ids=rng.sample(range(1, 581930), max(8, records // 10)))
    for write in WRITERS:
        write(draw)
    # Three one-word answers per picture (~170 tokens with the template's preamble), four pictures
    # per record of the budget: the visual task must be a large share of the supervised tokens for
    # the demo to learn to see in its two minutes (at ~5 % it does not).
    shapes.write_shapes(out / "shapes", train=SHAPES_PER_RECORD * records,
                        val=max(8, round(SHAPES_VAL_SHARE * records)), seed=rng.getrandbits(32))
    return _write_mixture(out, seed=42, image_size=image_size, max_length=max_length)


def _write_mixture(out: Path, seed: int, image_size: int, max_length: int) -> Path:
    """mixture.yaml with the paper's default counts (sample caps above what is here take all)."""
    coco = "coco/images"

    def src(name: str, type_: str, path: str, root: str | None = None, sample: int | str = "all") -> dict:
        entry: dict[str, Any] = {"name": name, "type": type_, "path": path}
        if root is not None:
            entry["image_root"] = root
        entry["sample"] = sample
        return entry

    config = {
        "seed": seed,
        "max_length": max_length,
        "language_vl_ratio": None,  # all of it: 1:1 would drop most of the visual task's records
        "on_error": "skip",
        "image_size": image_size,
        "sources": [
            src("dolly", "dolly", "dolly/databricks-dolly-15k.jsonl"),
            src("alpaca_gpt4", "alpaca", "alpaca_gpt4/alpaca_gpt4_data.json"),
            src("llava_detail", "llava", "llava/detail_23k.json", f"{coco}/train2017"),
            src("llava_complex", "llava", "llava/complex_reasoning_77k.json", f"{coco}/train2017"),
            src("llava_conversation", "llava", "llava/conversation_58k.json", f"{coco}/train2017"),
            src("minigpt4", "minigpt4", "cc_sbu_align/filter_cap.json", "cc_sbu_align"),
            src("aokvqa", "aokvqa", "aokvqa/aokvqa_v1p0_train.json", coco, 5000),
            src("coco_karpathy", "coco_caption", "coco/annotations/coco_karpathy_train.json", coco, 512),
            src("coco_captions", "coco_caption", "coco/annotations/captions_train2017.json",
                f"{coco}/train2017", 512),
            src("ocrvqa", "ocrvqa", "ocrvqa/dataset.json", "ocrvqa/images", 512),
            src("my_data", "generic", "my_data/conversations.jsonl", coco),
            src("shapes", "llava", f"shapes/{shapes.TRAIN_FILE}", f"shapes/{shapes.IMAGE_DIR}"),
        ],
    }
    path = out / "mixture.yaml"
    header = (
        "# Written by `mmgpt data sample`. Paths are relative to this file.\n"
        "# Paper default: all of Dolly, Alpaca-GPT4, LLaVA, MiniGPT-4; 5000 A-OKVQA, 512 COCO Caption,\n"
        "# 512 OCR-VQA; language-only : vision-language = 1 : 1 (here off: the shapes task is on top).\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
