"""The sample data's visual task: one solid shape on a plain background, asked about in LLaVA's format.

Each picture is one circle, square or triangle in red, green, blue or yellow on a white, black or
grey background, at a random position and size; its record asks, in a random order, "What color is
the shape?" (the colour's name) and "What shape is it?" (the shape's name), each answered in one
word, with colours, shapes and backgrounds cycled so that all 36 combinations come up equally
often. (Asking the background's colour too was tried: the tiny demo model then confuses the two
colour questions and names the background's colour, the commonest in the picture.) The answers can only come from the picture, so a model that
answers held-out pictures right has learned to look: the demo's proof that images -> CLIP ->
perceiver -> gated cross-attention -> LoRA trains (text-only sources cannot teach it). Two
questions per picture share one long prompt preamble: twice the supervised tokens per image.

Files are LLaVA-Instruct's layout (a JSON list of {id, image, conversations}), read by the
`llava` source for training and by `mmgpt eval --task llava` for scoring. The training file and the
separate held-out file (`shapes_val.json`) never share a picture: every picture's parameters are
drawn once from one seeded generator and a repeat is redrawn. Record k's colour is the k-th of the
sorted colour names (cycled): `launch/demo.sh` shows val_00000 (blue) and val_00002 (red).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
COLOUR_QUESTION = "What color is the shape?"
SHAPE_QUESTION = "What shape is it?"
PICTURE_SIZE = 64  # pixels; the model's transform resizes (the demo's CLIP input is 32)
TRAIN_FILE, VAL_FILE, IMAGE_DIR = "shapes_train.json", "shapes_val.json", "images"


@dataclass(frozen=True)
class Picture:
    """Everything that decides a picture's pixels."""

    colour: str
    shape: str
    background: str
    box: tuple[int, int, int, int]  # left, top, right, bottom of the shape's bounding square


def draw(picture: Picture) -> Image.Image:
    """The RGB picture: the shape filled in its colour on the background."""
    image = Image.new("RGB", (PICTURE_SIZE, PICTURE_SIZE), BACKGROUNDS[picture.background])
    pen = ImageDraw.Draw(image)
    fill = COLOURS[picture.colour]
    left, top, right, bottom = picture.box
    if picture.shape == "circle":
        pen.ellipse(picture.box, fill=fill)
    elif picture.shape == "square":
        pen.rectangle(picture.box, fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


def random_picture(rng: random.Random, colour: str, shape: str, background: str) -> Picture:
    """`colour` `shape` at a random size (9/16 to 15/16 of the side: the demo model sees 32 px) and position."""
    side = rng.randint(PICTURE_SIZE * 9 // 16, PICTURE_SIZE * 15 // 16)
    left, top = rng.randint(0, PICTURE_SIZE - side), rng.randint(0, PICTURE_SIZE - side)
    return Picture(colour, shape, background, (left, top, left + side - 1, top + side - 1))


def pictures(rng: random.Random, n: int, seen: set[Picture]) -> list[Picture]:
    """`n` pictures not in `seen` (added to it), colours, shapes and backgrounds cycled for balance
    (cycles of 4 and 3 are coprime: every colour-shape pair comes up in 12; the background
    changes every 12)."""
    out = []
    colours, backgrounds = sorted(COLOURS), sorted(BACKGROUNDS)
    for k in range(n):
        kind = (colours[k % len(colours)], SHAPES[k % len(SHAPES)], backgrounds[k // 12 % len(backgrounds)])
        picture = random_picture(rng, *kind)
        while picture in seen:
            picture = random_picture(rng, *kind)
        seen.add(picture)
        out.append(picture)
    return out


def record(name: str, picture: Picture, rng: random.Random) -> dict:
    """One LLaVA record: the two questions about the picture in a random order, one-word answers,
    `<image>` before or after the first question as in LLaVA's files."""
    rounds = [(COLOUR_QUESTION, picture.colour), (SHAPE_QUESTION, picture.shape)]
    rng.shuffle(rounds)
    turns = []
    for k, (question, answer) in enumerate(rounds):
        if k == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": name, "image": f"{name}.png", "conversations": turns}


def write_shapes(out: Path, train: int, val: int, seed: int) -> tuple[Path, Path]:
    """Write `train` + `val` records and their pictures under `out` (images in `out/images`);
    returns the two JSON files."""
    rng = random.Random(seed)
    seen: set[Picture] = set()
    files = []
    for split, n, file in (("train", train, TRAIN_FILE), ("val", val, VAL_FILE)):
        records = []
        for k, picture in enumerate(pictures(rng, n, seen)):
            name = f"{split}_{k:05d}"
            path = out / IMAGE_DIR / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw(picture).save(path)
            records.append(record(name, picture, rng))
        (out / file).write_text(json.dumps(records, indent=1), encoding="utf-8")
        files.append(out / file)
    return files[0], files[1]
