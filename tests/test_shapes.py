"""The sample data's visual task (mmgpt/data/shapes.py): valid LLaVA records, balanced answers,
pictures that show what the answer says, held-out pictures never seen in training."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmgpt.data import shapes
from mmgpt.data.sources.llava import parse_turns
from mmgpt.eval.tasks import read_llava


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("shapes")
    train, val = shapes.write_shapes(root, train=240, val=48, seed=7)
    return root, train, val


def pixels(path: Path) -> str:
    return hashlib.sha256(Image.open(path).convert("RGB").tobytes()).hexdigest()


def test_records_are_llava_records_with_one_image_and_a_one_word_answer(written):
    root, train, val = written
    for path in (train, val):
        records = json.loads(path.read_text())
        for k, rec in enumerate(records):
            assert set(rec) == {"id", "image", "conversations"}
            assert rec["conversations"][0]["value"].count("<image>") == 1
            (round_,) = parse_turns(rec["conversations"], path, f"record {k}")  # the training reader's parse
            assert round_.instruction in (shapes.COLOUR_QUESTION, shapes.SHAPE_QUESTION)
            assert round_.response in (*shapes.COLOURS, *shapes.SHAPES)
            assert (root / shapes.IMAGE_DIR / rec["image"]).is_file()
    items = read_llava(val)  # what `mmgpt eval --task llava` scores
    assert len(items) == 48 and all(len(item.answers) == 1 and "<image>" not in item.question for item in items)


def test_colours_and_shapes_are_balanced(written):
    _, train, _ = written
    answers = Counter()
    for rec in json.loads(train.read_text()):
        answers[(rec["conversations"][0]["value"].replace("<image>", "").strip(), rec["conversations"][1]["value"])] += 1
    colours = [answers[(shapes.COLOUR_QUESTION, c)] for c in shapes.COLOURS]
    kinds = [answers[(shapes.SHAPE_QUESTION, s)] for s in shapes.SHAPES]
    assert sum(colours) == sum(kinds) == 120
    assert max(colours) - min(colours) <= 1 and max(kinds) - min(kinds) <= 2, (colours, kinds)


def test_the_picture_shows_the_answer(written):
    """The colour asked about is the picture's most common colour that is no background's."""
    root, train, _ = written
    for rec in json.loads(train.read_text())[:40]:
        if rec["conversations"][0]["value"].replace("<image>", "").strip() != shapes.COLOUR_QUESTION:
            continue
        image = Image.open(root / shapes.IMAGE_DIR / rec["image"]).convert("RGB")
        counts = [(n, c) for n, c in image.getcolors(1 << 16) if c not in shapes.BACKGROUNDS.values()]
        assert max(counts)[1] == shapes.COLOURS[rec["conversations"][1]["value"]], rec


def test_held_out_pictures_are_not_training_pictures(written):
    root, train, val = written
    seen = {pixels(root / shapes.IMAGE_DIR / rec["image"]) for rec in json.loads(train.read_text())}
    held = [pixels(root / shapes.IMAGE_DIR / rec["image"]) for rec in json.loads(val.read_text())]
    assert len(seen) == 240 and len(set(held)) == len(held) and not seen & set(held)


def test_the_same_seed_writes_the_same_files(written, tmp_path):
    root, train, _ = written
    again, _ = shapes.write_shapes(tmp_path, train=240, val=48, seed=7)
    assert again.read_text() == train.read_text()
    assert pixels(tmp_path / shapes.IMAGE_DIR / "train_00017.png") == pixels(root / shapes.IMAGE_DIR / "train_00017.png")
