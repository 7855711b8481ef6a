"""The local tasks' document functions: mmgpt's own LLaVA reading, image paths, image loading and
exact match (mmgpt.eval.tasks, mmgpt.data.images, mmgpt.eval.metrics), so lmms-eval asks and scores
exactly what `mmgpt eval --task llava` (mmgpt_shapes) and `--task aokvqa` (mmgpt_aokvqa_mc) do.
Paths are relative to the working directory, the folder `mmgpt data sample` wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from mmgpt.data.images import find_image, open_rgb
from mmgpt.data.sources.llava import parse_turns
from mmgpt.eval.metrics import ocrvqa_exact_match
from mmgpt.eval.tasks import aokvqa_image

DATA = Path("shapes/shapes_val.json")
IMAGES = Path("shapes/images")
COCO = Path("coco/images")


def _first_round(doc: dict[str, Any]):
    return parse_turns(doc["conversations"], DATA, f"record {doc['id']}")[0]


def _image(root: Path, rel: str, where: str) -> list[Image.Image]:
    path = find_image(root, rel)
    image = path if isinstance(path, str) else open_rgb(path)
    if isinstance(image, str):
        raise ValueError(f"{where}: image {root / rel}: {image}")
    return [image]


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return _image(IMAGES, doc["image"], f"{DATA}: record {doc['id']}")


def aokvqa_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return _image(COCO, aokvqa_image(doc["split"], doc["image_id"]), f"A-OKVQA question {doc['question_id']}")


def doc_to_text(doc: dict[str, Any]) -> str:
    return _first_round(doc).instruction


def doc_to_target(doc: dict[str, Any]) -> str:
    return _first_round(doc).response


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": ocrvqa_exact_match(results[0], doc_to_target(doc))}
