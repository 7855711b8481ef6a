"""The unified template (paper Tables 1-3) and its tokenisation: exact strings, exact masks."""
from __future__ import annotations

import random

import pytest

from mmgpt.data import conversation as C
from mmgpt.contracts import IGNORE_INDEX
from mmgpt.data.conversation import Conversation, Round, encode_prompt, tokenize
from mmgpt.data.templates import CAPTION_INSTRUCTIONS, caption_instruction, render

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
    assert text == (  # every round is its own <s> ... </s>, as the original tokenises them
        "<s>" + HEADER + "### Image:\n<image>\n\n### Instruction:\nWhat is in the image?\n\n"
        "### Response:\nA bus.</s><s>\n\n### Instruction:\nWhat colour is it?\n\n"
        "### Response:\nRed and white.</s>"
    )
    assert [text[a:b] for a, b in spans] == ["A bus.</s>", "Red and white.</s>"]


def test_fields_are_stripped_the_template_owns_whitespace():
    conv = Conversation([Round("  Caption?\n", "A cake. ", input=" \n")])
    assert render(conv)[0].endswith("### Instruction:\nCaption?\n\n### Response:\nA cake.</s>")


def test_prompt_ids_are_training_ids_up_to_last_response(tiny_tokenizer):
    conv = Conversation([Round("Q1", "A1"), Round("Q2", "The answer.")], images=["x.jpg"])
    sample = tokenize(conv, tiny_tokenizer, 2048)
    prompt = encode_prompt(conv, tiny_tokenizer)
    assert sample.input_ids[: len(prompt)] == prompt
    assert sample.labels[len(prompt) - 1] == IGNORE_INDEX  # the last prompt token is unsupervised,
    assert sample.labels[len(prompt)] != IGNORE_INDEX  # the answer starts right after it
    assert tiny_tokenizer.decode(prompt).endswith("### Instruction:\nQ2\n\n### Response:\n")


def test_caption_instructions_table3():
    assert CAPTION_INSTRUCTIONS == (  # the paper's Table 3, verbatim
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
    draws = [caption_instruction(random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in CAPTION_INSTRUCTIONS
    seen = {caption_instruction(rng) for rng in [random.Random(5)] for _ in range(400)}
    assert seen == set(CAPTION_INSTRUCTIONS)


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
    supervised = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]
    assert all(lab == t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX)
    assert tiny_tokenizer.decode(supervised) == "".join(r.response.strip() + "</s>" for r in conv.rounds)
    assert sample.input_ids[0] == tiny_tokenizer.bos_token_id and sample.labels[0] == IGNORE_INDEX
    assert sample.input_ids.count(tiny_tokenizer.bos_token_id) == len(conv.rounds)  # one BOS per round
    assert sample.input_ids.count(tiny_tokenizer.eos_token_id) == len(conv.rounds)
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
        (Conversation([Round("Q?", "A.")], images=["a.jpg", "b.jpg"]), None),  # one block per image
    ],
)
def test_drop_reasons(conv, reason, tiny_tokenizer):
    result = tokenize(conv, tiny_tokenizer, 2048)
    if reason is None:
        assert not isinstance(result, str)
    else:
        assert result == reason


def test_special_token_strings_in_data_are_ordinary_text(tiny_tokenizer):
    """Data saying "<image>", "</s>", "<s>", "<PAD>" or "<|endofchunk|>" never yields special ids."""
    tok = tiny_tokenizer
    conv = Conversation([Round("Look <image> here <s> <|endofchunk|>", "A. </s> B. <PAD> <unk>")])
    sample = tokenize(conv, tok, 2048)
    specials = set(tok.all_special_ids)
    assert [t for t in sample.input_ids if t in specials] == [tok.bos_token_id, tok.eos_token_id]
    supervised = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised[:-1]) == "A. </s> B. <PAD> <unk>"


def test_token_straddling_the_prompt_boundary_is_dropped():
    """When prompt + response tokenise differently from the prompt alone, chat prompts would not
    match training: such a sample is dropped (the original silently mislabelled it)."""
    class Merging:  # a tokenizer whose last prompt piece merges with the response's first
        bos_token_id, eos_token_id = 1, 2

        def convert_tokens_to_ids(self, token):
            return 9

        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) for c in text.replace(":\nA", "@")]}

    assert tokenize(Conversation([Round("Q", "A")]), Merging(), 2048) == C.TOKEN_STRADDLES_BOUNDARY


# Token ids the ORIGINAL code (open-mmlab/Multimodal-GPT 9c73e47: LlavaDataset, DialDataset with its
# question/answer pairing fixed, DollyDataset, then its collater's label rules) gives on the
# bundled tiny tokenizer, obtained by running it with transformers 4.28.1's slow LlamaTokenizer.
HEADER_IDS = [1, 454, 451, 367, 296, 348, 782, 397, 497, 450, 632, 924, 349, 931, 282, 262, 259, 301, 935,
              933, 325, 920, 745, 262, 882, 926, 435, 913, 450, 849, 926, 316, 926, 349, 389, 333, 543, 515,
              915, 282, 263, 337, 663, 378, 417]
IMAGE_BLOCK_IDS = [820, 324, 928, 310, 951, 1001, 870]  # "### Image:" <image> "▁###" (whitespace stripped)
RESPONSE_IDS = [820, 533, 282, 926, 435, 913, 951, 942]  # "### Response:\n"
ORIGINAL = {
    "llava_single_round": (
        Conversation([Round("What is in the image?", "A cat sitting on a red sofa.")], images=["x.jpg"]),
        HEADER_IDS + IMAGE_BLOCK_IDS + [487, 403, 397, 497, 951, 942, 948, 328, 296, 273, 263, 339, 530, 942]
        + RESPONSE_IDS + [941, 278, 267, 477, 306, 262, 337, 923, 265, 918, 929, 914, 933, 2],
        74,
    ),
    "dialogue_two_rounds": (
        Conversation([Round("What color is the sofa?", "The sofa is red."),
                      Round("Is the cat asleep?", "No, the cat is awake and looking at the camera.")],
                     images=["x.jpg"]),
        HEADER_IDS + IMAGE_BLOCK_IDS + [487, 403, 397, 497, 951, 942, 948, 328, 794, 296, 263, 265, 918, 929,
                                        914, 530, 942] + RESPONSE_IDS
        + [943, 261, 265, 918, 929, 914, 296, 337, 923, 933, 2]
        + [1, 912, 731, 820, 487, 403, 397, 497, 951, 942, 945, 919, 263, 278, 267, 372, 274, 452, 530, 942]
        + RESPONSE_IDS + [733, 937, 263, 278, 267, 296, 262, 934, 914, 409, 293, 336, 432, 472, 436, 263,
                          278, 343, 271, 914, 933, 2],
        (77, 28),
    ),
    "dolly_with_input": (
        Conversation([Round("Summarize the passage.", "A fox jumps over a dog on a sunny day.",
                            input="The quick brown fox jumps over the lazy dog. It was a sunny day.")]),
        HEADER_IDS + [820, 487, 403, 397, 497, 951, 942, 957, 309, 928, 285, 838, 263, 788, 310, 417, 820, 487,
                      926, 352, 951, 942, 943, 261, 912, 663, 376, 277, 748, 917, 289, 918, 955, 455, 309, 926,
                      919, 264, 517, 263, 678, 959, 932, 458, 925, 933, 568, 438, 262, 885, 917, 932, 294, 429,
                      417] + RESPONSE_IDS
        + [941, 289, 918, 955, 455, 309, 926, 919, 264, 517, 262, 458, 925, 306, 262, 885, 917, 932, 294,
           429, 933, 2],
        108,
    ),
    "dolly_without_input": (
        Conversation([Round("Name three primary colors.", "Red, yellow and blue.")]),
        HEADER_IDS + [820, 487, 403, 397, 497, 951, 942, 971, 535, 355, 268, 913, 855, 300, 285, 932, 794, 919,
                      417] + RESPONSE_IDS + [982, 288, 937, 398, 609, 367, 293, 277, 480, 913, 933, 2],
        72,
    ),
}


def _original_labels(ids: list[int], unsupervised: int | tuple[int, ...]) -> list[int]:
    """The original's labels: each round's prompt tokens (its BOS included) are -100, the rest kept."""
    labels, start = [], 0
    rounds = [unsupervised] if isinstance(unsupervised, int) else list(unsupervised)
    ends = [i + 1 for i, t in enumerate(ids) if t == 2]
    for n, end in zip(rounds, ends):
        labels += [IGNORE_INDEX] * n + ids[start + n:end]
        start = end
    return labels


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_token_ids_and_labels_equal_the_original_code(name, tiny_tokenizer):
    conv, ids, unsupervised = ORIGINAL[name]
    sample = tokenize(conv, tiny_tokenizer, 2048)
    assert sample.input_ids == ids
    assert sample.labels == _original_labels(ids, unsupervised)
    # chat renders through the same code path: the prompt is the training ids up to the last answer
    last_answer = len(ids) - 1 - sample.labels[::-1].index(IGNORE_INDEX)
    assert encode_prompt(conv, tiny_tokenizer) == ids[:last_answer + 1]


def test_tokenisation_time_is_linear_in_rounds(tiny_tokenizer):
    """A 6000-turn record must not take quadratic time (the old offset matching did: ~100x for 10x
    rounds). Each round is encoded on its own, so 10x the rounds cost ~10x; a generous bound
    keeps this robust on a loaded machine."""
    import time

    def seconds(n: int) -> float:
        conv = Conversation([Round(f"Question number {i}?", f"Answer {i} is here.") for i in range(n)])
        start = time.perf_counter()
        assert not isinstance(tokenize(conv, tiny_tokenizer, 10**9), str)
        return time.perf_counter() - start

    seconds(50)  # warm-up
    assert seconds(6000) / seconds(600) < 30
