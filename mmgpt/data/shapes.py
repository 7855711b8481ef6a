"""The sample data's visual task: one solid shape on a plain background, asked about in LLaVA's format.

Each picture is one circle, square or triangle in red, green, blue or yellow on a white, black or
grey background, at a random position and size; its record asks "What color is the shape?" (answer:
the colour's name) or "What shape is it?" (the shape's name), alternating, with colours and shapes
cycled so both are balanced. The answer can only come from the picture, so a model that answers
held-out pictures right has learned to look: the demo's proof that images -> CLIP -> perceiver ->
gated cross-attention -> LoRA trains (text-only sources cannot teach it).

Files are LLaVA-Instruct's layout (a JSON list of {id, image, conversations}), read by the
`llava` source for training and by `mmgpt eval --task llava` for scoring. The training file and the
separate held-out file (`shapes_val.json`) never share a picture: every picture's parameters are
drawn once from one seeded generator and a repeat is redrawn.
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


def random_picture(rng: random.Random, colour: str, shape: str) -> Picture:
    """`colour` `shape` at a random size (a third to three quarters of the side) and position."""
    side = rng.randint(PICTURE_SIZE // 3, PICTURE_SIZE * 3 // 4)
    left, top = rng.randint(0, PICTURE_SIZE - side), rng.randint(0, PICTURE_SIZE - side)
    return Picture(colour, shape, rng.choice(sorted(BACKGROUNDS)), (left, top, left + side - 1, top + side - 1))


def pictures(rng: random.Random, n: int, seen: set[Picture]) -> list[Picture]:
    """`n` pictures not in `seen` (added to it), colours and shapes cycled for balance (the
    colour cycle's length 4 and the shape cycle's 3 are coprime: every pair comes up)."""
    out = []
    colours = sorted(COLOURS)
    for k in range(n):
        picture = random_picture(rng, colours[k % len(colours)], SHAPES[k % len(SHAPES)])
        while picture in seen:
            picture = random_picture(rng, picture.colour, picture.shape)
        seen.add(picture)
        out.append(picture)
    return out


def record(name: str, picture: Picture, ask_colour: bool, image_first: bool) -> dict:
    """One LLaVA record: one question about the picture and its one-word answer."""
    question, answer = (COLOUR_QUESTION, picture.colour) if ask_colour else (SHAPE_QUESTION, picture.shape)
    human = f"<image>\n{question}" if image_first else f"{question}\n<image>"
    return {"id": name, "image": f"{name}.png",
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}


def write_shapes(out: Path, train: int, val: int, seed: int) -> tuple[Path, Path]:
    """Write `train` + `val` records and their pictures under `out` (images in `out/images`);
    returns the two JSON files. Question kinds alternate per colour cycle, so each colour is asked
    about (and each shape named) equally often."""
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
            records.append(record(name, picture, ask_colour=(k // len(COLOURS)) % 2 == 0,
                                  image_first=rng.random() < 0.5))
        (out / file).write_text(json.dumps(records, indent=1), encoding="utf-8")
        files.append(out / file)
    return files[0], files[1]
