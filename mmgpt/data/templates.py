"""The paper's unified instruction template (MultiModal-GPT, Tables 1-3), round by round.

Language-only and vision-language data share one template so the model sees one prompt format.
`render_rounds` gives each round as its prompt pieces (text and image slots) and its response,
exactly the strings the original MultiModal-GPT code builds: the header (with one `### Image:`
block per image) opens the first round, later rounds start with "\n\n### Instruction:". The
original tokenises every round separately with its own BOS and appends EOS after each response;
`mmgpt.data.conversation` does the same, so training and chat see the original's token ids.
`render` is the same conversation as one display string (inspection).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmgpt.contracts import IMAGE

if TYPE_CHECKING:
    from mmgpt.data.conversation import Conversation


class ImageSlot:
    """Where an `<image>` token goes; a type of its own so that text saying "<image>" stays text."""

    def __repr__(self) -> str:
        return IMAGE


IMAGE_SLOT = ImageSlot()
Piece = str | ImageSlot


@dataclass
class RoundText:
    """One round: prompt pieces (unsupervised) and the response (supervised, then EOS)."""

    prompt: list[Piece]
    response: str


BOS = "<s>"
EOS = "</s>"

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
IMAGE_BLOCK: list[Piece] = ["### Image:\n", IMAGE_SLOT, "\n\n"]
INSTRUCTION = "### Instruction:\n{instruction}\n\n"
INPUT = "### Input:\n{input}\n\n"
RESPONSE = "### Response:\n"
ROUND_SEPARATOR = "\n\n"

# Paper Table 3, verbatim: the instructions for caption-only data (COCO Caption, MiniGPT-4).
CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Can you describe the image?",
    "Could you provide a description of the image?",
    "What do you see in this image?",
    "Share your thoughts on the content of the image.",
    "Please narrate what's happening in the picture.",
    "Can you give a brief explanation of the image?",
    "Describe the main elements and details present in the image.",
    "In your own words, what is depicted in the image?",
    "How would you describe the image's content in a caption?",
    "Can you suggest an insightful caption that highlights the underlying message of the image?",
)


def caption_instruction(rng: random.Random) -> str:
    """One Table 3 instruction, drawn with the caller's seeded RNG (reproducible per source)."""
    return rng.choice(CAPTION_INSTRUCTIONS)


def _round_prompt(conv: "Conversation", index: int) -> list[Piece]:
    rnd = conv.rounds[index]
    pieces: list[Piece] = [HEADER] + IMAGE_BLOCK * len(conv.images) if index == 0 else [ROUND_SEPARATOR]
    text = INSTRUCTION.format(instruction=rnd.instruction.strip())
    if rnd.input.strip():
        text += INPUT.format(input=rnd.input.strip())
    return pieces + [text + RESPONSE]


def render_rounds(conv: "Conversation") -> list[RoundText]:
    """Every round's prompt pieces and response. Fields are stripped of surrounding whitespace
    (the template owns all layout whitespace)."""
    return [RoundText(_round_prompt(conv, k), rnd.response.strip()) for k, rnd in enumerate(conv.rounds)]


def render(conv: "Conversation") -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one display string (`<s>` before and `</s>` after each round, `<image>`
    in place) and the [start, end) character span of each round's response and `</s>`."""
    text, spans = "", []
    for rnd in render_rounds(conv):
        text += BOS + "".join(str(p) if isinstance(p, str) else IMAGE for p in rnd.prompt)
        spans.append((len(text), len(text) + len(rnd.response) + len(EOS)))
        text += rnd.response + EOS
    return text, spans


def chat_template() -> str:
    """The prompt format as a Jinja chat template for `tokenizer.apply_chat_template`.

    Messages alternate user / assistant; a user message's content is a string or a list of
    `{"type": "image"}` / `{"type": "text", "text": ...}` parts (images are counted in the first
    user message, whose header carries one `### Image:` block each) and may carry an `input`
    (Dolly/Alpaca context). The string it renders tokenises (with `add_special_tokens=False`, on a
    LLaMA tokenizer that puts no `▁` after special tokens) to exactly `conversation.tokenize`'s ids:
    a space after `<s>` and after `<image>` stands in for the leading `▁` the original gave every
    text chunk, and no newline touches `<image>` (the original stripped it).
    """
    def literal(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'")

    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}"
        "{%- else -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
        " | join(' ') -%}"
        "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- endif -%}"
        "{%- if loop.first -%}"
        f"{{{{- '{BOS} {literal(HEADER)}' -}}}}"
        f"{{%- for _ in range(images) -%}}{{{{- '### Image:{IMAGE} ' -}}}}{{%- endfor -%}}"
        f"{{%- else -%}}{{{{- '{BOS} {literal(ROUND_SEPARATOR)}' -}}}}"
        "{%- endif -%}"
        "{{- '### Instruction:\\n' + text | trim + '\\n\\n' -}}"
        "{%- if message.get('input') and message['input'] | trim -%}"
        "{{- '### Input:\\n' + message['input'] | trim + '\\n\\n' -}}"
        "{%- endif -%}"
        f"{{{{- '{literal(RESPONSE)}' -}}}}"
        "{%- else -%}"
        f"{{{{- message['content'] | trim + '{EOS}' -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
