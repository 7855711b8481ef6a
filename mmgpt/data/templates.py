"""The paper's unified instruction template (MultiModal-GPT, Tables 1-3).

Language-only and vision-language data share one template so the model sees one prompt format.
`render` builds the whole conversation as ONE string with `<s>`, `</s>` and `<image>` inline and
returns the character spans that are supervised (each response and its EOS): tokenisation then
happens once on that string, so training and inference see the same token boundaries.

Every response is preceded by "\n" (end of "### Response:\n") and followed by the special token
`</s>`, so with a LLaMA sentencepiece tokenizer no token can straddle a prompt/response boundary.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

from mmgpt.models.tokenizer import IMAGE

if TYPE_CHECKING:
    from mmgpt.data.conversation import Conversation

BOS = "<s>"
EOS = "</s>"

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
IMAGE_BLOCK = f"### Image:\n{IMAGE}\n\n"
INSTRUCTION = "### Instruction:\n{instruction}\n\n"
INPUT = "### Input:\n{input}\n\n"
RESPONSE = "### Response:\n"
ROUND_SEPARATOR = "\n\n"

# Paper Table 3: instructions for caption-only data (the first ten of the released code's list).
CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "please describe the image",
    "can you describe the image",
    "Could you provide a description of the image?",
    "What do you see in this image?",
    "Share your thoughts on the content of the image.",
    "Please narrate what's happening in the picture.",
    "Can you give a brief explanation of the image?",
    "Describe the main elements and details present in the image.",
    "In your own words, what is depicted in the image?",
    "Can you outline the key aspects of the image?",
)


def caption_instruction(rng: random.Random) -> str:
    """One Table 3 instruction, drawn with the caller's seeded RNG (reproducible per source)."""
    return rng.choice(CAPTION_INSTRUCTIONS)


def _prompt_prefix(conv: "Conversation") -> str:
    return BOS + HEADER + IMAGE_BLOCK * len(conv.images)


def _round_prompt(index: int, instruction: str, input_text: str) -> str:
    text = ROUND_SEPARATOR if index > 0 else ""
    text += INSTRUCTION.format(instruction=instruction.strip())
    if input_text.strip():
        text += INPUT.format(input=input_text.strip())
    return text + RESPONSE


def render(conv: "Conversation") -> tuple[str, list[tuple[int, int]]]:
    """Full training text and the supervised [start, end) character span of each round.

    Span k covers round k's response and its `</s>`; round k ends exactly at span k's end, so
    truncation at a round boundary is a cut at a span end. Fields are stripped of surrounding
    whitespace (the template owns all layout whitespace).
    """
    parts = [_prompt_prefix(conv)]
    spans: list[tuple[int, int]] = []
    pos = len(parts[0])
    for k, rnd in enumerate(conv.rounds):
        prompt = _round_prompt(k, rnd.instruction, rnd.input)
        answer = rnd.response.strip() + EOS
        parts += [prompt, answer]
        start = pos + len(prompt)
        pos = start + len(answer)
        spans.append((start, pos))
    return "".join(parts), spans


def render_prompt(conv: "Conversation") -> str:
    """Generation prompt: every round rendered, the LAST round's response left for the model.

    The text equals `render(conv)[0]` up to the start of the last response, so inference sees the
    token boundaries the model was trained on.
    """
    if not conv.rounds:
        raise ValueError("render_prompt needs at least one round (the question to answer)")
    text, spans = render(conv)
    return text[: spans[-1][0]]
