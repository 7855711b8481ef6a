"""Benchmark metrics on small hand-checked fixtures (mmgpt.eval)."""
from __future__ import annotations

import json
import shutil

import pytest

from mmgpt.eval import (aokvqa_da_accuracy, aokvqa_da_mean, aokvqa_mc_accuracy, caption_scores,
                        ocrvqa_exact_match, vqa_accuracy, vqa_accuracy_mean, vqa_normalize)

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="needs Java: the COCO caption evaluation's PTB tokenizer runs on it")


# The processing steps the VQA evaluation page lists, as the official vqaEval.py applies them.
@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"),                      # lowercase, number words -> digits
    ("none", "0"),                     # "none" is a number word there
    ("the dog", "dog"),                # articles a/an/the removed
    ("A man on an elephant", "man on elephant"),
    ("dont", "don't"),                 # missing apostrophe restored
    ("couldnt've", "couldn't've"),
    ("couldntve", "couldntve"),        # the official table has no key for the bare word
    ("girl's", "girl's"),              # apostrophes are kept (possessives)
    ("2:50 pm", "2:50 pm"),            # colons are kept (times)
    ("100,978", "100978"),             # a comma between digits joins them
    ("1,000 red,white", "1000 redwhite"),  # ... and then every mark is dropped, not spaced
    ("red,white", "red white"),        # otherwise a mark inside a word becomes a space
    ("red, white", "red white"),       # and one touching a space is dropped
    ("yes.", "yes"),                   # periods go ...
    ("3.5", "3.5"),                    # ... except before a digit (decimals)
    ("5.", "5"),
    ("t-shirt!", "t shirt"),
    ("  Yes \n", "yes"),
])
def test_vqa_normalize_official_rules(raw: str, normalized: str) -> None:
    assert vqa_normalize(raw) == normalized


# The VQA metric: acc = min(#humans who said it / 3, 1), averaged over the 10 ways of leaving
# one of the 10 humans out. With k matching humans, leaving out a matcher (k subsets) leaves
# k-1 matches, leaving out anyone else (10-k subsets) leaves k.
@pytest.mark.parametrize("k, expected", [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),            # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),      # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),            # 0.9
    (4, (4 * 1 + 6 * 1) / 10),                  # 1.0
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(k: int, expected: float) -> None:
    humans = ["red"] * k + ["blue"] * (10 - k)
    assert vqa_accuracy("red", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_only_when_humans_disagree() -> None:
    # The humans disagree: both sides are normalised, so "Two." matches the two "2"s -> 0.6.
    assert vqa_accuracy("Two.", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    # All ten say "2": the official script compares after stripping only, so "Two." misses ...
    assert vqa_accuracy("Two.", ["2"] * 10) == 0.0
    # ... while whitespace is always stripped.
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0


def test_vqa_accuracy_mean_and_ids() -> None:
    humans = {1: ["yes"] * 10, 2: ["dog", "dog"] + ["cat"] * 8, 3: ["2"] * 3 + ["3"] * 7}
    preds = {1: "yes", 2: "The dog", 3: "two"}
    assert vqa_accuracy_mean(preds, humans) == pytest.approx((1.0 + 0.6 + 0.9) / 3)
    with pytest.raises(ValueError, match="1 ids without a prediction"):
        vqa_accuracy_mean({1: "yes", 2: "dog"}, humans)


AOKVQA = {
    "q1": {"choices": ["cat", "dog", "bird", "fish"], "correct_choice_idx": 1,
           "direct_answers": ["dog"] * 2 + ["puppy"] * 8, "difficult_direct_answer": False},
    "q2": {"choices": ["red", "blue", "green", "pink"], "correct_choice_idx": 0,
           "direct_answers": ["red"] * 10, "difficult_direct_answer": True},
}


def test_aokvqa_official_rules() -> None:
    # Direct answer: min(#equal / 3, 1), no leave-one-out: 2 of 10 -> 2/3 (VQA would give 0.6).
    assert aokvqa_da_accuracy("dog", AOKVQA["q1"]["direct_answers"]) == pytest.approx(2 / 3)
    assert aokvqa_da_accuracy("puppy", AOKVQA["q1"]["direct_answers"]) == 1.0
    assert aokvqa_da_accuracy("Puppy", AOKVQA["q1"]["direct_answers"]) == 0.0  # exact match
    # q2 is difficult for direct answer: left out, and needs no prediction.
    assert aokvqa_da_mean({"q1": "dog"}, AOKVQA) == pytest.approx(2 / 3)
    assert aokvqa_da_mean({"q1": "dog", "q2": "blue"}, AOKVQA) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        aokvqa_da_mean({"q2": "red"}, AOKVQA)
    # Multiple choice counts every question.
    assert aokvqa_mc_accuracy({"q1": "dog", "q2": "blue"}, AOKVQA) == 0.5
    assert aokvqa_mc_accuracy({"q1": "dog", "q2": "red"}, AOKVQA) == 1.0


@pytest.mark.parametrize("pred, answer, hit", [
    ("Harry Potter", "harry potter", 1.0),
    ("  Yes.\n", "yes", 1.0),
    ("C++   Primer", "c++ primer", 1.0),  # case and runs of spaces go, inner marks stay
    ("Who Moved My Cheese", "Who Moved My Cheese?", 1.0),
    ("Mr Men", "Mr. Men", 0.0),                # only trailing punctuation is forgiven
    ("Harry Potter 2", "harry potter", 0.0),
])
def test_ocrvqa_exact_match(pred: str, answer: str, hit: float) -> None:
    assert ocrvqa_exact_match(pred, answer) == hit


# Two images with disjoint words, one reference each, so every n-gram of a reference occurs in
# one image of two: idf = log(2) - log(1) for all of them (and log(2) - log(max(1, 0)) for a
# predicted n-gram seen in no reference), i.e. every tf-idf weight is log 2. CIDEr-D per image
# is 10 * mean over n=1..4 of the clipped cosine, with no length penalty at equal lengths:
#   image "bus": "red bus parks there" vs "red bus parks here":
#     1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0 -> 10 * (23/12) / 4 = 230/48
#   image "cat": identical -> 10 * (1 + 1 + 1 + 1) / 4 = 10
# BLEU-4 (corpus, brevity penalty 1): clipped precisions 7/8, 5/6, 3/4, 1/2 (4th root of product).
REFS = {"bus": ["red bus parks here"], "cat": ["small cat sleeps inside"]}
HAND_CIDER = (230 / 48 + 10) / 2
HAND_BLEU4 = (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25


@needs_java
def test_cider_and_bleu_by_hand() -> None:
    # Capitals and punctuation vanish in the PTB tokenisation, and ids pair by key, not order.
    preds = {"cat": "Small cat sleeps inside.", "bus": "Red bus, parks THERE!"}
    scores = caption_scores(preds, REFS, meteor=False)
    assert scores["CIDEr"] == pytest.approx(HAND_CIDER, rel=1e-6)
    assert scores["Bleu_4"] == pytest.approx(HAND_BLEU4, rel=1e-6)
    assert scores["missing"] == {"METEOR": "not requested"}
    # Swapping the captions between the images shares no n-gram with the references.
    swapped = caption_scores({"cat": preds["bus"], "bus": preds["cat"]}, REFS, meteor=False)
    assert swapped["CIDEr"] == 0.0


@needs_java
def test_caption_scores_agree_with_coco_eval_cap_on_coco_json(tmp_path, monkeypatch) -> None:
    """The same captions as COCO-format JSON files through pycocotools and the library's own
    COCOEvalCap pipeline (SPICE stubbed out: it downloads models) give the same scores."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    refs = {1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave",
                "a person surfing on the ocean"],
            2: ["two dogs play with a frisbee in the park", "dogs running on the grass"],
            3: ["a plate of food with broccoli and rice", "a white plate topped with food"]}
    preds = {1: "A man riding a wave on a surfboard.", 2: "Two dogs running in a park",
             3: "a plate of rice and meat"}
    ann = {"images": [{"id": i} for i in refs], "annotations": [
        {"id": n, "image_id": i, "caption": c}
        for n, (i, c) in enumerate(((i, c) for i, cs in refs.items() for c in cs), start=1)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps(
        [{"image_id": i, "caption": c} for i, c in preds.items()]))

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self) -> str:
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO(str(tmp_path / "ann.json"))
    reference = coco_eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    reference.evaluate()

    ours = caption_scores(preds, refs)
    assert ours["missing"] == {}
    for name in ("CIDEr", "Bleu_4", "METEOR"):
        assert ours[name] == pytest.approx(reference.eval[name], rel=1e-9), name
    assert 0.5 < ours["CIDEr"] < 10 and 0 < ours["METEOR"] < 1  # a non-degenerate case


@needs_java
def test_meteor_failure_is_reported_not_raised(monkeypatch) -> None:
    from pycocoevalcap.meteor import meteor

    monkeypatch.setattr(meteor, "METEOR_JAR", "no-such-meteor.jar")  # the JVM starts, then exits
    preds = {"cat": "small cat sleeps inside", "bus": "red bus parks there"}
    scores = caption_scores(preds, REFS)
    assert scores["CIDEr"] == pytest.approx(HAND_CIDER, rel=1e-6)
    assert "METEOR" not in scores and "failed" in scores["missing"]["METEOR"]


def test_missing_java_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="needs Java"):
        caption_scores({"cat": "a cat"}, {"cat": ["a cat"]})


def test_caption_ids_must_match() -> None:
    with pytest.raises(ValueError, match="ids without a prediction"):
        caption_scores({"cat": "a cat"}, REFS)
