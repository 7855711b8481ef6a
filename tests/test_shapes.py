"""The sample data's visual task (mmgpt/data/shapes.py): valid LLaVA records, balanced answers,
pictures that show what the answers say, held-out pictures never seen in training."""
from __future__ import annotations

import hashlib
import json
import random
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


QUESTIONS = {shapes.COLOUR_QUESTION: shapes.COLOURS, shapes.SHAPE_QUESTION: shapes.SHAPES}


def answers(path: Path) -> list[dict[str, str]]:
    """Question -> answer of each record, as the training reader parses it."""
    return [{r.instruction: r.response for r in parse_turns(rec["conversations"], path, f"record {k}")}
            for k, rec in enumerate(json.loads(path.read_text()))]


def test_records_are_llava_records_with_one_image_and_one_word_answers(written):
    root, train, val = written
    for path in (train, val):
        records = json.loads(path.read_text())
        for rec, asked in zip(records, answers(path)):
            assert set(rec) == {"id", "image", "conversations"} and (root / shapes.IMAGE_DIR / rec["image"]).is_file()
            assert rec["conversations"][0]["value"].count("<image>") == 1
            assert sum(turn["value"].count("<image>") for turn in rec["conversations"]) == 1
            assert set(asked) == set(QUESTIONS) and all(asked[q] in QUESTIONS[q] for q in QUESTIONS)
    first = {json.loads(train.read_text())[k]["conversations"][0]["value"].replace("<image>", "").strip()
             for k in range(30)}
    assert first == set(QUESTIONS)  # the order varies
    items = read_llava(val)  # what `mmgpt eval --task llava` scores: the first question
    assert len(items) == 48 and all(len(item.answers) == 1 and item.question in QUESTIONS for item in items)


def test_colours_shapes_and_backgrounds_are_balanced(written):
    _, train, _ = written
    for question, names in QUESTIONS.items():
        counts = Counter(asked[question] for asked in answers(train))
        assert set(counts) == set(names) and max(counts.values()) == min(counts.values()), counts
    drawn = shapes.pictures(random.Random(0), 36, set())  # the generator's cycle: all 36 combinations
    assert len({(p.colour, p.shape, p.background) for p in drawn}) == 36
    pairs = Counter((asked[shapes.COLOUR_QUESTION], asked[shapes.SHAPE_QUESTION]) for asked in answers(train))
    assert len(pairs) == 12 and max(pairs.values()) == min(pairs.values())  # 240 = 20 x 12


def test_the_pictures_show_the_answers(written):
    """The shape's colour is the commonest colour that is no background's."""
    root, train, _ = written
    for rec, asked in list(zip(json.loads(train.read_text()), answers(train)))[:40]:
        image = Image.open(root / shapes.IMAGE_DIR / rec["image"]).convert("RGB")
        colours = {c: n for n, c in image.getcolors(1 << 16)}
        shape = max((c for c in colours if c not in shapes.BACKGROUNDS.values()), key=colours.__getitem__)
        assert shape == shapes.COLOURS[asked[shapes.COLOUR_QUESTION]], rec


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
