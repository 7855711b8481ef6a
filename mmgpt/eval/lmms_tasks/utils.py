"""The mmgpt_shapes task's document functions: mmgpt's own LLaVA reading, image loading and exact
match (mmgpt.eval.tasks.read_llava, mmgpt.data.images, mmgpt.eval.metrics), so lmms-eval asks and
scores exactly what `mmgpt eval --task llava` does. Paths are relative to the working directory,
the folder `mmgpt data sample` wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from mmgpt.data.images import find_image, open_rgb
from mmgpt.data.sources.llava import parse_turns
from mmgpt.eval.metrics import ocrvqa_exact_match

DATA = Path("shapes/shapes_val.json")
IMAGES = Path("shapes/images")


def _first_round(doc: dict[str, Any]):
    return parse_turns(doc["conversations"], DATA, f"record {doc['id']}")[0]


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    path = find_image(IMAGES, doc["image"])
    image = path if isinstance(path, str) else open_rgb(path)
    if isinstance(image, str):
        raise ValueError(f"{DATA}: record {doc['id']}: image {doc['image']}: {image}")
    return [image]


def doc_to_text(doc: dict[str, Any]) -> str:
    return _first_round(doc).instruction


def doc_to_target(doc: dict[str, Any]) -> str:
    return _first_round(doc).response


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": ocrvqa_exact_match(results[0], doc_to_target(doc))}
