"""Readers: every real-sample file parses; exact conversations and rendered strings on fixed records;
bad records become errors that name file, location and field."""
from __future__ import annotations

import codecs
import json
from collections import defaultdict

import pytest

from data_helpers import REAL_SAMPLE_TYPES, llava_record, write_json, write_lines
from mmgpt.data.conversation import Round, tokenize
from mmgpt.data.sources import READERS, RecordError
from mmgpt.data.sources.base import (BAD_FIELD, MALFORMED_JSON, MISSING_FIELD, NESTING_TOO_DEEP, NUMBER_TOO_LONG,
                                     READER_ERROR)
from mmgpt.data.templates import CAPTION_INSTRUCTIONS, HEADER, render


def read(real_samples, name):
    return READERS[REAL_SAMPLE_TYPES[name]](real_samples / name, source=name, seed=42)


def test_mapping_covers_every_real_sample_file(real_samples):
    data_files = {p.name for p in real_samples.iterdir() if p.suffix in (".json", ".jsonl")}
    assert data_files == set(REAL_SAMPLE_TYPES)


@pytest.mark.parametrize("name", sorted(REAL_SAMPLE_TYPES))
def test_every_real_sample_parses_and_tokenises(real_samples, name, tiny_tokenizer):
    result = read(real_samples, name)
    assert result.errors == []
    assert result.conversations
    for conv in result.conversations:
        assert conv.source == name and name in conv.origin
        sample = tokenize(conv, tiny_tokenizer, max_length=4096)
        assert not isinstance(sample, str), (conv.origin, sample)
        supervised = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != -100]
        assert tiny_tokenizer.decode(supervised) == "".join(r.response.strip() + "</s>" for r in conv.rounds)


def test_record_counts(real_samples):
    counts = {name: len(read(real_samples, name).conversations) for name in REAL_SAMPLE_TYPES}
    assert counts == {
        "dolly.jsonl": 10, "alpaca_gpt4.json": 2, "baize_quora.json": 1, "llava_detail_23k.json": 2,
        "llava_complex_reasoning_77k.json": 2, "llava_conversation_58k.json": 7,
        "minigpt4_filter_cap.json": 1, "aokvqa_train.json": 1, "coco_karpathy_train.json": 2,
        "coco_captions_train2017.json": 3, "ocrvqa_dataset.json": 1,
    }


def test_dolly_context_becomes_input(real_samples):
    conv = read(real_samples, "dolly.jsonl").conversations[0]
    rnd = conv.rounds[0]
    assert rnd.instruction == "When did Virgin Australia start operating?"
    assert rnd.input.startswith("Virgin Australia, the trading name") and rnd.input.endswith("Sydney.[4]")
    assert rnd.response == ("Virgin Australia commenced services on 31 August 2000 as Virgin Blue, "
                            "with two aircraft on a single route.")
    text, _ = render(conv)
    assert text == ("<s>" + HEADER + "### Instruction:\nWhen did Virgin Australia start operating?\n\n"
                    f"### Input:\n{rnd.input}\n\n### Response:\n{rnd.response}</s>")
    no_context = read(real_samples, "dolly.jsonl").conversations[1]
    assert render(no_context)[0] == ("<s>" + HEADER + "### Instruction:\nWhich is a species of fish? "
                                     "Tope or Rope\n\n### Response:\nTope</s>")
    escaped = read(real_samples, "dolly.jsonl").conversations[3]
    assert "what\u2019s the name" in escaped.rounds[0].instruction


def test_alpaca_exact(real_samples):
    convs = read(real_samples, "alpaca_gpt4.json").conversations
    assert convs[0].rounds[0].input == "" and convs[0].images == []
    assert render(convs[1])[0] == (
        "<s>" + HEADER + "### Instruction:\nIdentify the odd one out.\n\n### Input:\nTwitter, Instagram, "
        "Telegram\n\n### Response:\nThe odd one out is Telegram. Twitter and Instagram are social media "
        "platforms mainly for sharing information, images and videos while Telegram is a cloud-based "
        "instant messaging and voice-over-IP service.</s>"
    )


@pytest.mark.parametrize("name", ["llava_detail_23k.json", "llava_complex_reasoning_77k.json",
                                  "llava_conversation_58k.json"])
def test_llava_rounds_in_order_and_marker_stripped(real_samples, name):
    records = json.loads((real_samples / name).read_text())
    convs = read(real_samples, name).conversations
    for rec, conv in zip(records, convs, strict=True):
        turns = rec["conversations"]
        assert conv.images == [rec["image"]] and rec["image"] == rec["id"] + ".jpg"
        assert len(conv.rounds) == len(turns) // 2
        for k, rnd in enumerate(conv.rounds):
            question = turns[2 * k]["value"]
            if k == 0:
                assert "<image>" in question
                question = question.replace("<image>", "").strip()
            assert (rnd.instruction, rnd.response) == (question, turns[2 * k + 1]["value"])
            assert "<image>" not in rnd.instruction


def test_llava_multi_round_rendered_exact(real_samples):
    conv = read(real_samples, "llava_conversation_58k.json").conversations[0]
    assert render(conv)[0] == (
        "<s>" + HEADER + "### Image:\n<image>\n\n"
        "### Instruction:\nWhat are the colors of the bus in the image?\n\n"
        "### Response:\nThe bus in the image is white and red.</s><s>\n\n"
        "### Instruction:\nWhat feature can be seen on the back of the bus?\n\n"
        "### Response:\nThe back of the bus features an advertisement.</s><s>\n\n"
        "### Instruction:\nIs the bus driving down the street or pulled off to the side?\n\n"
        "### Response:\nThe bus is driving down the street, which is crowded with people and other vehicles.</s>"
    )


def test_minigpt4(real_samples):
    conv = read(real_samples, "minigpt4_filter_cap.json").conversations[0]
    assert conv.images == ["image/2.jpg"]
    assert conv.rounds[0].instruction in CAPTION_INSTRUCTIONS
    assert conv.rounds[0].response.startswith("The image shows a man fishing on a lawn")


def test_aokvqa_response_and_image_path(real_samples):
    conv = read(real_samples, "aokvqa_train.json").conversations[0]
    assert conv.images == ["train2017/000000299207.jpg"]
    assert conv.rounds == [Round(
        "What is the man by the bags awaiting?",
        "The answer is cab. Because A train would not be on the street, he would not have luggage waiting "
        "for a delivery, and the skateboarder is there and not paying attention to him so a cab is the only "
        "possible answer. He has bags as if he is going someone, and he is on a road waiting for vehicle that "
        "can only be moved on the road and is big enough to hold the bags. He looks to be waiting for a paid "
        "ride to pick him up.",
    )]


def test_coco_karpathy_and_original(real_samples):
    karpathy = read(real_samples, "coco_karpathy_train.json").conversations
    assert karpathy[0].images == ["val2014/COCO_val2014_000000522418.jpg"]
    assert karpathy[0].rounds[0].instruction in CAPTION_INSTRUCTIONS
    assert render(karpathy[0])[0].endswith("### Response:\nA woman wearing a net on her head cutting a cake.</s>")

    data = json.loads((real_samples / "coco_captions_train2017.json").read_text())
    captions = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    convs = read(real_samples, "coco_captions_train2017.json").conversations
    assert [c.images for c in convs] == [[img["file_name"]] for img in data["images"]]
    for img, conv in zip(data["images"], convs):
        assert conv.rounds[0].response in captions[img["id"]]  # the caption of THIS image
        assert conv.rounds[0].instruction in CAPTION_INSTRUCTIONS
    again = read(real_samples, "coco_captions_train2017.json").conversations
    assert again == convs  # seeded: same draws


def test_ocrvqa_all_pairs_and_one_pair(real_samples):
    conv = read(real_samples, "ocrvqa_dataset.json").conversations[0]
    assert conv.images == ["761183272.jpg"]
    assert [(r.instruction, r.response) for r in conv.rounds] == [
        ("Who wrote this book?", "Sandra Boynton"),
        ("What is the title of this book?", "Mom's Family Wall Calendar 2016"),
        ("What is the genre of this book?", "Calendars"),
        ("Is this a games related book?", "No"),
        ("What is the year printed on this calendar?", "2016"),
    ]
    one = READERS["ocrvqa"](real_samples / "ocrvqa_dataset.json", source="o", seed=1, pairs="one")
    assert len(one.conversations[0].rounds) == 1 and one.conversations[0].rounds[0] in conv.rounds


def test_baize_turns(real_samples):
    conv = read(real_samples, "baize_quora.json").conversations[0]
    assert conv.images == [] and len(conv.rounds) == 5
    assert conv.rounds[0] == Round(
        "I want to know the step by step guide to invest in share market in India.",
        "Sure, I can help with that. Firstly, you need to open a demat and trading account with a "
        "registered stockbroker.",
    )
    assert conv.rounds[-1].instruction == "How do I track my investments?"


def test_generic_format(tmp_path):
    path = write_lines(tmp_path / "mine.jsonl", [
        json.dumps({"image": ["a.jpg", "b.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": "Same."}]}),
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}),
    ])
    convs = READERS["generic"](path, source="mine", seed=0).conversations
    assert convs[0].images == ["a.jpg", "b.jpg"] and convs[0].rounds == [Round("Compare them.", "Same.")]
    assert render(convs[0])[0].startswith("<s>" + HEADER + "### Image:\n<image>\n\n### Image:\n<image>\n\n")
    assert convs[1].images == [] and convs[1].rounds == [Round("Hi", "Hello!")]


def test_malformed_line_and_missing_field_are_located(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "a", "context": "", "response": "b"}),
        '{"instruction": "a", ',
        json.dumps({"instruction": "a", "context": ""}),
        json.dumps({"instruction": 3, "response": "b"}),
    ])
    with open(path, "ab") as f:
        f.write(b'{"instruction": "caf\xe9", "response": "b"}\n')  # latin-1, not UTF-8
    result = READERS["dolly"](path, source="d", seed=0)
    assert len(result.conversations) == 1 and result.records == 5
    (bad_json, missing, mistyped, latin1) = result.errors
    assert bad_json.reason == MALFORMED_JSON and "d.jsonl: line 2" in str(bad_json)
    assert missing.reason == MISSING_FIELD and "line 3" in str(missing) and "'response'" in str(missing)
    assert mistyped.reason == BAD_FIELD and "line 4" in str(mistyped) and "'instruction'" in str(mistyped)
    assert latin1.reason == MALFORMED_JSON and "line 5" in str(latin1) and "UTF-8" in str(latin1)


def test_broken_json_file_names_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "x", "output": "y"},\n {"instruction": }]')
    with pytest.raises(RecordError, match=r"a.json: line 2 column \d+: malformed_json"):
        READERS["alpaca"](path, source="a", seed=0)


def test_utf8_bom_is_tolerated(tmp_path):
    """Windows tools write one; it used to make a whole JSON-list source read=1, kept=0."""
    alpaca = tmp_path / "a.json"
    alpaca.write_bytes(codecs.BOM_UTF8 + json.dumps([{"instruction": "x", "output": "y"}]).encode())
    dolly = tmp_path / "d.jsonl"
    dolly.write_bytes(codecs.BOM_UTF8 + json.dumps({"instruction": "x", "response": "y"}).encode() + b"\n")
    for path, kind in ((alpaca, "alpaca"), (dolly, "dolly")):
        result = READERS[kind](path, source=kind, seed=0)
        assert result.errors == [] and [c.rounds for c in result.conversations] == [[Round("x", "y")]], kind


JSON_LIST = ('[{"instruction": "x", "output": "y"},\n{"instruction": "café", "output": "y2"},\n'
             '{"instruction": "z", "output": "w"}]')


@pytest.mark.parametrize("damaged, where, reason", [
    (JSON_LIST[:-7].encode(), r"line 3 column \d+", "malformed_json"),  # truncated
    (JSON_LIST.encode().replace("é".encode(), b"\xc3"), "line 2 column 21", "malformed_json: not UTF-8"),
    (JSON_LIST.replace('"y2"', "[" * 100_000 + "]" * 100_000).encode(), "line 2 column 1", "nesting_too_deep"),
])
def test_json_list_that_does_not_parse_names_line_and_column(tmp_path, damaged, where, reason):
    path = tmp_path / "a.json"
    path.write_bytes(codecs.BOM_UTF8 + damaged)  # a BOM does not shift the reported position
    with pytest.raises(RecordError, match=rf"a.json: {where}: {reason}"):
        READERS["alpaca"](path, source="a", seed=0)


def test_values_python_cannot_convert_fail_only_their_record(tmp_path):
    huge = "9" * 5000
    alpaca = tmp_path / "a.json"
    alpaca.write_text(f'[{{"instruction": "x", "output": {huge}}}, {{"instruction": "x", "output": "y", '
                      f'"id": {huge}}}, {{"instruction": "\\ud800", "output": "y"}}]')
    result = READERS["alpaca"](alpaca, source="a", seed=0)
    assert [(e.reason, e.where, e.field) for e in result.errors] == [(NUMBER_TOO_LONG, "record 0", "output")]
    assert len(result.conversations) == 2  # a huge number no reader reads harms nothing
    assert result.conversations[1].rounds[0].instruction == "\ud800"  # the mixture drops it (bad_text)
    deep = '{"instruction": "x", "response": "y", "deep": ' + "[" * 5000 + "]" * 5000 + "}"
    dolly = write_lines(tmp_path / "d.jsonl", [deep, json.dumps({"instruction": "x", "response": "y"})])
    result = READERS["dolly"](dolly, source="d", seed=0)
    assert [(e.reason, e.where) for e in result.errors] == [(NESTING_TOO_DEEP, "line 1")] and result.conversations


def test_unforeseen_exception_fails_only_its_record(tmp_path):
    path = write_json(tmp_path / "ocr.json", {
        "1": {"imageURL": "http://[broken/1.jpg", "questions": ["Q?"], "answers": ["A."]},
        "2": {"imageURL": "http://x/2.jpg", "questions": ["Q?"], "answers": ["A."]}})
    result = READERS["ocrvqa"](path, source="o", seed=0)
    assert [c.images for c in result.conversations] == [["2.jpg"]]
    (err,) = result.errors
    assert err.reason == READER_ERROR and "key '1'" in str(err) and "ValueError" in str(err)
    generic = write_lines(tmp_path / "g.jsonl", [json.dumps({"id": "\ud800", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})])
    (conv,) = READERS["generic"](generic, source="g", seed=0).conversations
    assert conv.origin == "g.jsonl line 1 id \\ud800"  # escaped: printable in any message


def test_llava_turn_order_errors(tmp_path):
    bad = llava_record("x.jpg", "<image>\nQ", "A")
    bad["conversations"] = bad["conversations"][::-1]
    odd = llava_record("y.jpg", "<image>\nQ", "A")
    odd["conversations"].append({"from": "human", "value": "dangling"})
    no_image = llava_record("z.jpg", "<image>\nQ", "A")
    del no_image["image"]
    path = write_json(tmp_path / "l.json", [bad, odd, no_image, llava_record("ok.jpg", "Q\n<image>", "A")])
    result = READERS["llava"](path, source="l", seed=0)
    assert [c.images for c in result.conversations] == [["ok.jpg"]]
    messages = [str(e) for e in result.errors]
    assert "record 0 turn 0" in messages[0] and "'from'" in messages[0]
    assert "record 1" in messages[1] and "no gpt answer" in messages[1]
    assert "record 2" in messages[2] and "'image'" in messages[2] and result.errors[2].reason == MISSING_FIELD
