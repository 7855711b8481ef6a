"""Few-shot prompts as OpenFlamingo's evaluation suite writes them (open_flamingo/eval/evaluate.py
and models/open_flamingo.py), so a `mmgpt eval --shots N` number sits next to OpenFlamingo's table.

  VQA      `<image>Question:{q} Short answer:{a}<|endofchunk|>` + "\n" per demonstration, then
           `<image>Question:{q} Short answer:`; the demonstration's answer is its first reference.
  caption  `<image>Output:{caption}<|endofchunk|>` + "\n" per demonstration, then `<image>Output:`;
           the demonstration's caption is its image's first reference, stripped.
The text is tokenised whole by the model's tokenizer (BOS first), as OpenFlamingo's `_prepare_text`
does, generation stops at `<|endofchunk|>` or EOS, and the prediction is post-processed as
OpenFlamingo does (VQA: cut at "Question"/"Answer"/"Short", then at the first ", "; captions: cut at
"Output", quotes removed). Demonstrations come from the train split as OpenFlamingo draws them: a
seeded query set of `query_set_size` train items, then `shots` distinct ones per evaluated item. The
per-item draw is seeded by (seed, item position), so it does not depend on world size or batch size
(OpenFlamingo's depends on its rank); a demonstration never shows the evaluated item's own image.
Differences that remain: greedy decoding (OpenFlamingo: 3 beams), and no 0-shot-with-text-demos mode
(`--shots 0` is mmgpt's own instruction prompt).
"""
from __future__ import annotations

import random
import re
from typing import Callable

from transformers import PreTrainedTokenizerBase

from mmgpt.contracts import ENDOFCHUNK, IMAGE
from mmgpt.eval.tasks import EvalItem

def vqa_prompt(question: str, answer: str | None = None) -> str:
    end = f"{answer}{ENDOFCHUNK}" if answer is not None else ""
    return f"{IMAGE}Question:{question} Short answer:{end}"


def caption_prompt(caption: str | None = None) -> str:
    end = f"{caption}{ENDOFCHUNK}" if caption is not None else ""
    return f"{IMAGE}Output:{end}"


def postprocess_vqa(text: str) -> str:
    return re.split(", ", re.split("Question|Answer|Short", text, maxsplit=1)[0], maxsplit=1)[0]


def postprocess_caption(text: str) -> str:
    return text.split("Output", 1)[0].replace('"', "")


def fewshot_text(kind: str, demos: list[EvalItem], item: EvalItem) -> str:
    """The whole prompt of `item` after its demonstrations (`kind`: "vqa" or "caption")."""
    if kind == "vqa":
        return "".join(vqa_prompt(d.question, d.answers[0]) + "\n" for d in demos) + vqa_prompt(item.question)
    return "".join(caption_prompt(d.answers[0].strip()) + "\n" for d in demos) + caption_prompt()


def fewshot_ids(kind: str, demos: list[EvalItem], item: EvalItem, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer(fewshot_text(kind, demos, item))["input_ids"]


POSTPROCESS: dict[str, Callable[[str], str]] = {"vqa": postprocess_vqa, "caption": postprocess_caption}


def draw_demos(pool: list[EvalItem], items: list[EvalItem], shots: int, seed: int,
               query_set_size: int) -> list[list[EvalItem]]:
    """`shots` demonstrations per item from a seeded query set of the train pool (OpenFlamingo's
    defaults, `mmgpt eval`'s too: seed 42, query set 2048)."""
    query_set = random.Random(seed).sample(pool, min(query_set_size, len(pool)))
    out = []
    for position, item in enumerate(items):
        candidates = [d for d in query_set if d.image != item.image]
        if len(candidates) < shots:
            raise ValueError(f"--shots {shots}: only {len(candidates)} demonstrations in the train split's "
                             f"query set for item {item.id!r}")
        out.append(random.Random(f"{seed}:{position}").sample(candidates, shots))
    return out
