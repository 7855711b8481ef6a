"""Readers of the evaluation files, in the formats the benchmarks publish them, into EvalItems.

One item is one prompt: an image (a path relative to the image root the user gives), the
instruction the model is asked, and what it is scored against. The files are the originals:
  vqa           VQAv2 or OK-VQA: `*_questions.json` ({data_subtype, questions: [{question_id,
                image_id, question}]}) plus `*_annotations.json` ({annotations: [{question_id,
                answers: [{answer}]}]}); image `{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg`
                under the COCO root, as the Karpathy files name them.
  coco_caption  the Karpathy/LAVIS list ([{image, caption: str | [str], image_id?}], records of one
                image merged), Karpathy's own `dataset_coco.json` ({images: [{filepath, filename,
                split, sentences: [{raw}], cocoid}]}, one split) or COCO `captions_*.json`
                ({images: [{id, file_name}], annotations: [{image_id, caption}]}).
  aokvqa        `aokvqa_v1p0_{split}.json`: [{question_id, image_id, question, choices,
                correct_choice_idx, direct_answers, difficult_direct_answer, split?}]; image
                `{split}2017/{image_id:012d}.jpg` under the COCO root, as the training reader has it.
  ocrvqa        `dataset.json`: {id: {imageURL, questions, answers, split}} with split 1/2/3 =
                train/val/test; one item per question, image `{id}{extension of imageURL}`.
  llava         LLaVA-Instruct's layout ([{id, image, conversations}]), e.g. the sample data's
                visual task (`shapes/shapes_val.json`): one item per record, its first question
                (image markers stripped) against its first answer, scored by exact match.
A malformed record is an error naming the file and record (mmgpt.data.sources.base.RecordError):
skipping it would quietly change the benchmark's denominator. Missing images are not checked
here; the evaluation counts and skips them as it loads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from mmgpt.data.sources.base import BAD_FIELD, RecordError, expect_list, get, load_json
from mmgpt.data.sources.llava import parse_turns
from mmgpt.data.templates import CAPTION_INSTRUCTIONS

# Paper Table 3's first caption instruction: the one zero-shot caption prompt.
CAPTION_PROMPT = CAPTION_INSTRUCTIONS[0]
OCRVQA_SPLITS = {"train": 1, "val": 2, "test": 3}


@dataclass
class EvalItem:
    """One question about one image and its references."""

    id: str | int  # question_id (VQA, A-OKVQA), image id (captions), "{book id}:{k}" (OCR-VQA)
    image: str  # relative to the image root
    question: str  # the instruction the model is given
    answers: list[str]  # VQA human answers, reference captions, A-OKVQA direct answers, OCR-VQA answer
    choices: list[str] = field(default_factory=list)  # A-OKVQA multiple choice
    correct_choice: int | None = None
    difficult: bool = False  # A-OKVQA `difficult_direct_answer`: left out of the DA score


def _strings(rec: Any, key: str, path: Path, where: str) -> list[str]:
    values = get(rec, key, list, path, where)
    if not values or not all(isinstance(v, str) for v in values):
        raise RecordError(path, where, BAD_FIELD, "expected a non-empty list of strings", key)
    return values


def read_vqa(questions: Path, annotations: Path) -> list[EvalItem]:
    """VQAv2 / OK-VQA questions joined with their annotations' human answers."""
    qdata = load_json(questions)
    subtype = get(qdata, "data_subtype", str, questions, "top level")
    answers: dict[int, list[str]] = {}
    adata = load_json(annotations)
    for i, ann in enumerate(get(adata, "annotations", list, annotations, "top level")):
        where = f"annotations[{i}]"
        qid = get(ann, "question_id", int, annotations, where)
        answers[qid] = [get(a, "answer", str, annotations, f"{where}.answers")
                        for a in get(ann, "answers", list, annotations, where)]
    items = []
    for i, q in enumerate(get(qdata, "questions", list, questions, "top level")):
        where = f"questions[{i}]"
        qid = get(q, "question_id", int, questions, where)
        if not answers.get(qid):
            raise RecordError(annotations, "annotations", BAD_FIELD, f"no answers for question_id {qid}")
        image_id = get(q, "image_id", int, questions, where)
        items.append(EvalItem(id=qid, image=f"{subtype}/COCO_{subtype}_{image_id:012d}.jpg",
                              question=get(q, "question", str, questions, where), answers=answers[qid]))
    return items


def read_captions(path: Path, split: str = "test") -> list[EvalItem]:
    """Reference captions per image from any of the three caption layouts (`split` selects the
    images of Karpathy's dataset_coco.json; the other two layouts are one split already)."""
    data = load_json(path)
    refs: dict[str | int, tuple[str, list[str]]] = {}  # id -> (image, captions), in file order

    def add(key: str | int, image: str, captions: list[str]) -> None:
        refs.setdefault(key, (image, []))[1].extend(captions)

    if isinstance(data, list):
        for i, rec in enumerate(data):
            where = f"record {i}"
            caption = get(rec, "caption", (str, list), path, where)
            image = get(rec, "image", str, path, where)
            captions = [caption] if isinstance(caption, str) else _strings(rec, "caption", path, where)
            add(get(rec, "image_id", (int, str), path, where, default=image), image, captions)
    elif isinstance(data, dict) and "annotations" in data:
        files = {get(im, "id", int, path, f"images[{i}]"): get(im, "file_name", str, path, f"images[{i}]")
                 for i, im in enumerate(get(data, "images", list, path, "top level"))}
        for i, ann in enumerate(get(data, "annotations", list, path, "top level")):
            image_id = get(ann, "image_id", int, path, f"annotations[{i}]")
            if image_id not in files:
                raise RecordError(path, f"annotations[{i}]", BAD_FIELD, f"image_id {image_id} not in images")
            add(image_id, files[image_id], [get(ann, "caption", str, path, f"annotations[{i}]")])
    elif isinstance(data, dict) and "images" in data:
        for i, im in enumerate(get(data, "images", list, path, "top level")):
            where = f"images[{i}]"
            if get(im, "split", str, path, where) != split:
                continue
            sentences = [get(s, "raw", str, path, f"{where}.sentences")
                         for s in get(im, "sentences", list, path, where)]
            image = f"{get(im, 'filepath', str, path, where)}/{get(im, 'filename', str, path, where)}"
            add(get(im, "cocoid", int, path, where), image, sentences)
    else:
        raise RecordError(path, "top level", BAD_FIELD,
                          "neither a Karpathy list, Karpathy's dataset_coco.json nor COCO captions json")
    empty = [k for k, (_, caps) in refs.items() if not caps]
    if empty:
        raise RecordError(path, f"image {empty[0]!r}", BAD_FIELD, "no reference caption")
    return [EvalItem(id=k, image=image, question=CAPTION_PROMPT, answers=caps) for k, (image, caps) in refs.items()]


def aokvqa_image(split: str, image_id: int) -> str:
    """An A-OKVQA record's COCO 2017 image, relative to the COCO root."""
    return f"{split}2017/{image_id:012d}.jpg"


def read_aokvqa(path: Path, split: str = "val") -> list[EvalItem]:
    """A-OKVQA questions with choices and direct answers (the test split, which withholds both,
    cannot be scored locally)."""
    items = []
    for i, rec in enumerate(expect_list(path, load_json(path))):
        where = f"record {i}"
        choices = _strings(rec, "choices", path, where)
        correct = get(rec, "correct_choice_idx", int, path, where)
        if not 0 <= correct < len(choices):
            raise RecordError(path, where, BAD_FIELD, f"no choice {correct}", "correct_choice_idx")
        image_id = get(rec, "image_id", int, path, where)
        record_split = get(rec, "split", str, path, where, default=split)
        items.append(EvalItem(
            id=get(rec, "question_id", str, path, where), image=aokvqa_image(record_split, image_id),
            question=get(rec, "question", str, path, where), answers=_strings(rec, "direct_answers", path, where),
            choices=choices, correct_choice=correct,
            difficult=get(rec, "difficult_direct_answer", bool, path, where, default=False)))
    return items


def read_ocrvqa(path: Path, split: str = "test") -> list[EvalItem]:
    """Every question of the books in `split` (train | val | test)."""
    if split not in OCRVQA_SPLITS:
        raise ValueError(f"OCR-VQA split must be one of {sorted(OCRVQA_SPLITS)}, got {split!r}")
    data = load_json(path)
    if not isinstance(data, dict):
        raise RecordError(path, "top level", BAD_FIELD, "expected an object keyed by book id")
    items = []
    for key, rec in data.items():
        where = f"key {key!r}"
        if get(rec, "split", int, path, where) != OCRVQA_SPLITS[split]:
            continue
        questions, answers = _strings(rec, "questions", path, where), _strings(rec, "answers", path, where)
        if len(questions) != len(answers):
            raise RecordError(path, where, BAD_FIELD, "questions and answers differ in length", "answers")
        suffix = PurePosixPath(urlparse(get(rec, "imageURL", str, path, where)).path).suffix or ".jpg"
        items += [EvalItem(id=f"{key}:{k}", image=key + suffix, question=q, answers=[a])
                  for k, (q, a) in enumerate(zip(questions, answers))]
    return items


def read_llava(path: Path) -> list[EvalItem]:
    """The first round of each LLaVA record, asked zero-shot as training rendered it."""
    items = []
    for i, rec in enumerate(expect_list(path, load_json(path))):
        where = f"record {i}"
        first = parse_turns(get(rec, "conversations", list, path, where), path, where)[0]
        items.append(EvalItem(id=get(rec, "id", (str, int), path, where, default=i),
                              image=get(rec, "image", str, path, where), question=first.instruction,
                              answers=[first.response]))
    return items
