"""Evaluation metrics of the standard benchmarks, computed as their official scripts do.

All accuracies are fractions in [0, 1] (papers print them x100). Caption scores come from
pycocoevalcap (the COCO caption evaluation) on PTB-tokenised text, so they are on the
library's scale (CIDEr ~1 for a good model, papers again print x100).
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from mmgpt.eval.vqa_normalize import vqa_normalize, vqa_strip

__all__ = [
    "aokvqa_da_accuracy", "aokvqa_da_mean", "aokvqa_mc_accuracy", "caption_scores",
    "ocrvqa_exact_match", "ocrvqa_normalize", "vqa_accuracy", "vqa_accuracy_mean",
]


def _same_keys(predictions: Mapping, targets: Mapping, what: str) -> None:
    """Refuse partial result sets: the official scripts assert the question/image ids match,
    and a silently smaller denominator would inflate the score."""
    missing, extra = targets.keys() - predictions.keys(), predictions.keys() - targets.keys()
    if missing or extra:
        raise ValueError(f"{what}: {len(missing)} ids without a prediction "
                         f"(e.g. {sorted(map(str, missing))[:3]}), {len(extra)} predictions "
                         f"for unknown ids (e.g. {sorted(map(str, extra))[:3]})")
    if not targets:
        raise ValueError(f"{what}: nothing to score")


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one answer: min(#humans who gave it / 3, 1), averaged over the subsets
    that leave one human out (10 choose 9 for VQAv2's ten answers).

    As in the official vqaEval.py (current version), answers are compared after
    vqa_normalize only when the humans disagree; when all gave the same answer the prediction
    must equal it after nothing but vqa_strip (VQAv2's stored answers are already normalised,
    so a unanimous "yes" is not matched by "Yes." there either).
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred, gts = vqa_strip(prediction), [vqa_strip(a) for a in human_answers]
    if len(set(gts)) > 1:
        pred, gts = vqa_normalize(pred), [vqa_normalize(a) for a in gts]
    # Leaving out a human who gave `pred` leaves hits - 1 matches, anyone else leaves hits.
    hits, n = gts.count(pred), len(gts)
    return (hits * min(1.0, (hits - 1) / 3) + (n - hits) * min(1.0, hits / 3)) / n


def vqa_accuracy_mean(predictions: Mapping[Hashable, str],
                      human_answers: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus VQA accuracy (VQAv2, OK-VQA): the mean of vqa_accuracy over all questions."""
    _same_keys(predictions, human_answers, "vqa")
    return sum(vqa_accuracy(predictions[q], human_answers[q]) for q in human_answers) / len(
        human_answers)


def aokvqa_mc_accuracy(predictions: Mapping[Hashable, str],
                       records: Mapping[Hashable, Mapping[str, Any]]) -> float:
    """A-OKVQA multiple choice over A-OKVQA records (`choices`, `correct_choice_idx`): the
    fraction of questions whose prediction is exactly the correct choice, as the official
    eval_predictions.py counts it (map free text to a choice first; anything else is wrong)."""
    _same_keys(predictions, records, "aokvqa mc")
    return sum(predictions[q] == r["choices"][r["correct_choice_idx"]]
               for q, r in records.items()) / len(records)


def aokvqa_da_accuracy(prediction: str, direct_answers: Sequence[str]) -> float:
    """A-OKVQA direct answer, as its official script scores it: min(#direct_answers equal to the
    prediction / 3, 1) with exact string equality. Unlike VQA there is no leave-one-out
    averaging and no normalisation (the stored direct answers are lowercase already)."""
    return min(1.0, sum(prediction == a for a in direct_answers) / 3)


def aokvqa_da_mean(predictions: Mapping[Hashable, str],
                   records: Mapping[Hashable, Mapping[str, Any]]) -> float:
    """Corpus A-OKVQA direct-answer accuracy over A-OKVQA records (`direct_answers`,
    `difficult_direct_answer`): the official script leaves out the questions marked difficult
    for direct answer, so only those need predictions."""
    scored = {q: r["direct_answers"] for q, r in records.items()
              if not r.get("difficult_direct_answer", False)}
    kept = {q: p for q, p in predictions.items() if q in scored or q not in records}
    _same_keys(kept, scored, "aokvqa da")
    return sum(aokvqa_da_accuracy(kept[q], scored[q]) for q in scored) / len(scored)


_SPACES = re.compile(r"\s+")
_TRAILING_PUNCT = ".,;:!?"


def ocrvqa_normalize(answer: str) -> str:
    """OCR-VQA has no official scorer; exact match is taken after lowercasing, collapsing runs of
    whitespace, stripping the ends and then trailing sentence punctuation (.,;:!?), so that
    "Yes." matches "yes" while titles keep inner punctuation ("C++ Primer", "Mr. Men")."""
    return _SPACES.sub(" ", answer.lower()).strip().rstrip(_TRAILING_PUNCT).rstrip()


def ocrvqa_exact_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction equals the answer after ocrvqa_normalize, else 0.0."""
    return float(ocrvqa_normalize(prediction) == ocrvqa_normalize(answer))


def _ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenise with the COCO evaluation's tokenizer (Stanford CoreNLP, run with Java), and
    check what came back: the library zips output lines to ids without looking, so a Java
    failure would otherwise surface as a wrong score or an unrelated assertion."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        tokenized = PTBTokenizer().tokenize(
            {k: [{"caption": c} for c in caps] for k, caps in captions.items()})
    except OSError as err:
        raise RuntimeError("the PTB tokenizer of pycocoevalcap needs Java (and writes a temporary "
                           f"file beside its jar): {err}") from err
    bad = [k for k, caps in captions.items() if len(tokenized.get(k, ())) != len(caps)]
    if bad:
        raise RuntimeError(
            f"the PTB tokenizer (Java) returned incomplete output, e.g. for {bad[0]!r}")
    return tokenized


def caption_scores(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]],
                   meteor: bool = True) -> dict[str, Any]:
    """COCO caption metrics of one caption per image against its references.

    Returns {"CIDEr": float, "Bleu_4": float, "METEOR": float, "missing": {name: reason}}
    (the names of COCOEvalCap); METEOR runs a Java process and loads a paraphrase table
    (~10 s), so it is skipped with meteor=False and reported under "missing" when it cannot
    run, instead of failing the whole evaluation. CIDEr's idf comes from the references of
    all images given, so it is 0 for a single image and only comparable across equal sets.
    SPICE is not computed: it downloads Stanford models at first use.
    """
    _same_keys(predictions, references, "captions")
    if any(not refs for refs in references.values()):
        raise ValueError("captions: every image needs at least one reference")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = list(references)
    gts = _ptb_tokenize({k: list(references[k]) for k in ids})
    res = _ptb_tokenize({k: [predictions[k]] for k in ids})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores: dict[str, Any] = {"CIDEr": float(cider), "Bleu_4": float(bleu[3]), "missing": {}}
    if not meteor:
        scores["missing"]["METEOR"] = "not requested"
        return scores
    scores.update(_meteor(gts, res))
    return scores


def _meteor(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> dict[str, Any]:
    """METEOR 1.5 through pycocoevalcap's wrapper; its jar and paraphrase data ship in the wheel,
    so it needs Java (and ~2 GB of heap) but no network."""
    from pycocoevalcap.meteor.meteor import Meteor

    if shutil.which("java") is None:
        return {"missing": {"METEOR": "no `java` on PATH (METEOR 1.5 is a Java program)"}}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as err:  # the jar died: a broken pipe, or no number to read
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        try:  # flushes what the dead jar never read; the wrapper's __del__ would raise on it
            scorer.meteor_p.stdin.close()
        except BrokenPipeError:
            pass
        detail = scorer.meteor_p.stderr.read(2000).decode(errors="replace").strip()
        return {"missing": {"METEOR": f"the METEOR jar failed: {err!r} {detail}".strip()}}
    finally:
        # compute_score holds the wrapper's lock when it raises, and the wrapper's __del__
        # takes that lock: release it, or garbage collection would hang.
        if scorer.lock.locked():
            scorer.lock.release()
    return {"METEOR": float(score), "missing": {}}
