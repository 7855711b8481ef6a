"""The unified template (paper Tables 1-3) and its tokenisation: exact strings, exact masks."""
from __future__ import annotations

import random

import pytest

from mmgpt.data import conversation as C
from mmgpt.data.batch import IGNORE_INDEX
from mmgpt.data.conversation import Conversation, Round, tokenize
from mmgpt.data.templates import CAPTION_INSTRUCTIONS, caption_instruction, render, render_prompt

HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def test_language_only_template_table1_exact():
    conv = Conversation([Round("Give three tips for staying healthy.", "Eat well.")])
    text, spans = render(conv)
    assert text == (
        "<s>" + HEADER + "### Instruction:\nGive three tips for staying healthy.\n\n"
        "### Response:\nEat well.</s>"
    )
    assert [text[a:b] for a, b in spans] == ["Eat well.</s>"]


def test_language_only_template_with_input_exact():
    conv = Conversation([Round("Identify the odd one out.", "Telegram.", input="Twitter, Instagram, Telegram")])
    text, _ = render(conv)
    assert text == (
        "<s>" + HEADER + "### Instruction:\nIdentify the odd one out.\n\n"
        "### Input:\nTwitter, Instagram, Telegram\n\n### Response:\nTelegram.</s>"
    )


def test_vision_language_template_table2_multi_round_exact():
    conv = Conversation(
        [Round("What is in the image?", "A bus."), Round("What colour is it?", "Red and white.")],
        images=["000000033471.jpg"],
    )
    text, spans = render(conv)
    assert text == (
        "<s>" + HEADER + "### Image:\n<image>\n\n### Instruction:\nWhat is in the image?\n\n"
        "### Response:\nA bus.</s>\n\n### Instruction:\nWhat colour is it?\n\n"
        "### Response:\nRed and white.</s>"
    )
    assert [text[a:b] for a, b in spans] == ["A bus.</s>", "Red and white.</s>"]


def test_fields_are_stripped_the_template_owns_whitespace():
    conv = Conversation([Round("  Caption?\n", "A cake. ", input=" \n")])
    assert render(conv)[0].endswith("### Instruction:\nCaption?\n\n### Response:\nA cake.</s>")


def test_render_prompt_is_training_text_up_to_last_response():
    conv = Conversation([Round("Q1", "A1"), Round("Q2", "ignored")], images=["x.jpg"])
    prompt = render_prompt(conv)
    assert prompt.endswith("### Instruction:\nQ2\n\n### Response:\n")
    assert render(conv)[0].startswith(prompt)


def test_caption_instructions_table3():
    assert len(CAPTION_INSTRUCTIONS) == 10 and len(set(CAPTION_INSTRUCTIONS)) == 10
    draws = [caption_instruction(random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in CAPTION_INSTRUCTIONS
    seen = {caption_instruction(rng) for rng in [random.Random(5)] for _ in range(400)}
    assert seen == set(CAPTION_INSTRUCTIONS)


def _response_char_ranges(text: str, conv: Conversation) -> set[int]:
    """Independent reference: find each response + EOS in the text, left to right."""
    chars, pos = set(), 0
    for rnd in conv.rounds:
        target = "### Response:\n" + rnd.response.strip() + "</s>"
        start = text.index(target, pos) + len("### Response:\n")
        end = start + len(rnd.response.strip()) + len("</s>")
        chars.update(range(start, end))
        pos = end
    return chars


CASES = [
    Conversation([Round("Which is a species of fish? Tope or Rope", "Tope")]),
    Conversation([Round("Summarize.", "It commenced services in 2000.[3]", input="Virgin Australia...\n\n[4]")]),
    Conversation(
        [Round("What are the colors of the bus?", "White and red."),
         Round("What feature can be seen?", "1. An advertisement.\n\n2. A \u2019quote\u2019."),
         Round("Is it moving?", "Yes -- driving   down the street.")],
        images=["a.jpg"],
    ),
]


@pytest.mark.parametrize("conv", CASES)
def test_mask_covers_exactly_responses_and_eos(conv, tiny_tokenizer):
    sample = tokenize(conv, tiny_tokenizer, max_length=2048)
    assert not isinstance(sample, str), sample
    text, _ = render(conv)
    enc = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert sample.input_ids == enc["input_ids"]
    expected_chars = _response_char_ranges(text, conv)
    for tok, label, (s, e) in zip(sample.input_ids, sample.labels, enc["offset_mapping"]):
        covered = set(range(s, e))
        if label == IGNORE_INDEX:
            assert not covered & expected_chars, (text[s:e], "unsupervised token inside a response")
        else:
            assert label == tok and covered <= expected_chars, (text[s:e], "supervised token outside")
    supervised = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == "".join(r.response.strip() + "</s>" for r in conv.rounds)
    assert sample.input_ids[0] == tiny_tokenizer.bos_token_id and sample.labels[0] == IGNORE_INDEX
    assert sample.input_ids.count(tiny_tokenizer.bos_token_id) == 1
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert sample.input_ids.count(image_id) == len(conv.images)
    assert all(lab == IGNORE_INDEX for t, lab in zip(sample.input_ids, sample.labels) if t == image_id)
    assert sample.is_vl == bool(conv.images)


def test_truncation_keeps_whole_rounds_and_equals_fewer_rounds(tiny_tokenizer):
    rounds = [Round(f"Question {k}?", f"Answer number {k} is here.") for k in range(3)]
    conv = Conversation(rounds, images=["x.jpg"])
    one = tokenize(Conversation(rounds[:1], images=["x.jpg"]), tiny_tokenizer, 2048)
    two = tokenize(Conversation(rounds[:2], images=["x.jpg"]), tiny_tokenizer, 2048)
    for limit in (len(two), len(two) + 1):  # exactly two rounds fit
        cut = tokenize(conv, tiny_tokenizer, limit)
        assert (cut.input_ids, cut.labels) == (two.input_ids, two.labels)
    cut = tokenize(conv, tiny_tokenizer, len(two) - 1)
    assert (cut.input_ids, cut.labels) == (one.input_ids, one.labels)
    assert tokenize(conv, tiny_tokenizer, len(one) - 1) == C.TOO_LONG


@pytest.mark.parametrize(
    "conv, reason",
    [
        (Conversation([Round("Q?", "  \n")]), C.EMPTY_RESPONSE),
        (Conversation([Round("Q?", "A."), Round("Q2?", "")]), C.EMPTY_RESPONSE),
        (Conversation([]), C.NO_ROUNDS),
        (Conversation([Round("Look <image> here", "A.")]), C.IMAGE_COUNT_MISMATCH),
        (Conversation([Round("Q?", "A.")], images=["a.jpg", "b.jpg"]), None),  # one block per image
        (Conversation([Round("Q?", "A. </s> B.")]), C.SPECIAL_TOKEN_IN_TEXT),
        (Conversation([Round("<s>Q?", "A.")]), C.SPECIAL_TOKEN_IN_TEXT),
    ],
)
def test_drop_reasons(conv, reason, tiny_tokenizer):
    result = tokenize(conv, tiny_tokenizer, 2048)
    if reason is None:
        assert not isinstance(result, str)
    else:
        assert result == reason


def test_straddling_token_is_detected():
    spans = [(10, 20)]
    assert C._supervision([(0, 10), (10, 15), (15, 20), (20, 22)], spans) == [False, True, True, False]
    assert C._supervision([(0, 12), (12, 20)], spans) is None  # prompt token reaching into a response
    assert C._supervision([(10, 21)], spans) is None  # response token reaching past its EOS
