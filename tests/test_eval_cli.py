"""`mmgpt eval`: the readers of the original evaluation files, batched generation and answer
scoring against one row at a time, and the command end to end on a tiny model that memorised a
few VQA pairs (near-perfect on its own questions, near-zero once the answers are shuffled), with
skipped images, the report, the model card, the other tasks and a two-rank gloo run.

Tolerances: answer log-likelihoods of a padded batch agree with one row alone to 1e-4 (float32,
different attention shapes); token sequences must be identical.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_export import make_base, save_run

from mmgpt.data.conversation import Conversation, Round, encode_prompt, tokenize
from mmgpt.data.images import load_image
from mmgpt.image_transform import clip_transform
from mmgpt.data.packing import collate
from mmgpt.cli import main
from mmgpt.cli import eval as eval_cli
from mmgpt.eval import fewshot
from mmgpt.eval.benchmark import TASKS
from mmgpt.eval.batched import answer_logprobs, generate_batch
from mmgpt.eval.tasks import CAPTION_PROMPT, EvalItem, read_aokvqa, read_captions, read_ocrvqa, read_vqa
from mmgpt.export import export
from mmgpt.inference.generation import GenerationConfig, generate
from mmgpt.media import row_layout
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.models.flamingo import MediaContext
from mmgpt.train.loss import packed_loss
from model_helpers import open_gates, randomize_lora_b

SIZE = preset_image_size("tiny")
REPO = Path(__file__).resolve().parent.parent
QA = [("What colour is the bus?", "red"), ("Is the dog sleeping?", "yes"), ("How many cats are there?", "two"),
      ("What is the man holding?", "tennis"), ("Where is the woman?", "kitchen"), ("Is it raining?", "no")]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 230, 40), (200, 40, 200), (40, 220, 220)]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- readers of the original formats

def vqa_files(root: Path, pairs: list[tuple[int, str, list[str]]], name: str = "v2") -> tuple[Path, Path]:
    """VQAv2-layout questions + annotations for (image_id, question, human answers); question_id
    is image_id * 10."""
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                 "data_subtype": "val2014",
                 "questions": [{"image_id": i, "question": q, "question_id": i * 10} for i, q, _ in pairs]}
    annotations = {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": [
        {"question_type": "what", "multiple_choice_answer": a[0], "image_id": i, "answer_type": "other",
         "question_id": i * 10,
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]}
        for i, _, a in pairs]}
    return (write_json(root / f"{name}_OpenEnded_mscoco_val2014_questions.json", questions),
            write_json(root / f"{name}_mscoco_val2014_annotations.json", annotations))


def test_vqa_reader_joins_questions_and_annotations(tmp_path):
    q, a = vqa_files(tmp_path, [(42, "What is it?", ["cat"] * 9 + ["dog"]), (7, "How many?", ["2"] * 10)])
    items = read_vqa(q, a)
    assert [(i.id, i.image, i.question) for i in items] == [
        (420, "val2014/COCO_val2014_000000000042.jpg", "What is it?"),
        (70, "val2014/COCO_val2014_000000000007.jpg", "How many?")]
    assert items[0].answers == ["cat"] * 9 + ["dog"]
    ann = json.loads(a.read_text())
    ann["annotations"].pop()
    write_json(a, ann)
    with pytest.raises(ValueError, match="no answers for question_id 70"):
        read_vqa(q, a)


def test_caption_readers_accept_karpathy_lists_dataset_coco_and_coco_captions(tmp_path):
    lavis_test = write_json(tmp_path / "coco_karpathy_test.json", [
        {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["a cat.", "a kitten."]},
        {"image": "val2014/COCO_val2014_000000000002.jpg", "caption": ["a dog."]}])
    per_caption = write_json(tmp_path / "coco_karpathy_train.json", [
        {"image": "train2014/a.jpg", "caption": "one", "image_id": "coco_1"},
        {"image": "train2014/a.jpg", "caption": "two", "image_id": "coco_1"}])
    karpathy = write_json(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test", "cocoid": 5,
         "sentences": [{"raw": "A red bus.", "tokens": ["a", "red", "bus"]}]},
        {"filepath": "val2014", "filename": "y.jpg", "split": "val", "cocoid": 6, "sentences": [{"raw": "No."}]}]})
    original = write_json(tmp_path / "captions_val2017.json", {
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 3, "file_name": "000000000003.jpg"}],
        "annotations": [{"image_id": 9, "id": 1, "caption": "food"}, {"image_id": 3, "id": 2, "caption": "a bed"},
                        {"image_id": 9, "id": 4, "caption": "a plate"}]})

    def summary(items):
        assert all(i.question == CAPTION_PROMPT == "Can you describe the image?" for i in items)
        return [(i.id, i.image, i.answers) for i in items]

    assert summary(read_captions(lavis_test)) == [
        ("val2014/COCO_val2014_000000000001.jpg", "val2014/COCO_val2014_000000000001.jpg", ["a cat.", "a kitten."]),
        ("val2014/COCO_val2014_000000000002.jpg", "val2014/COCO_val2014_000000000002.jpg", ["a dog."])]
    assert summary(read_captions(per_caption)) == [("coco_1", "train2014/a.jpg", ["one", "two"])]
    assert summary(read_captions(karpathy)) == [(5, "val2014/x.jpg", ["A red bus."])]
    assert summary(read_captions(karpathy, split="val")) == [(6, "val2014/y.jpg", ["No."])]
    assert summary(read_captions(original)) == [(9, "000000000009.jpg", ["food", "a plate"]),
                                                 (3, "000000000003.jpg", ["a bed"])]
    with pytest.raises(ValueError, match="neither"):
        read_captions(write_json(tmp_path / "bad.json", {"something": []}))


def aokvqa_record(qid: str, image_id: int, question: str, choices: list[str], correct: int,
                  direct: list[str], difficult: bool = False) -> dict:
    return {"split": "val", "image_id": image_id, "question_id": qid, "question": question, "choices": choices,
            "correct_choice_idx": correct, "direct_answers": direct, "difficult_direct_answer": difficult,
            "rationales": ["Because it is."]}


def test_aokvqa_and_ocrvqa_readers(tmp_path):
    aok = write_json(tmp_path / "aokvqa_v1p0_val.json", [
        aokvqa_record("22MexNkBPpdZGX6sxbxVBH", 299207, "What is the man holding?",
                      ["bat", "kite", "ball", "racket"], 3, ["racket"] * 8 + ["tennis racket"] * 2, True)])
    [item] = read_aokvqa(aok)
    assert (item.id, item.image, item.choices[item.correct_choice], item.difficult) == (
        "22MexNkBPpdZGX6sxbxVBH", "val2017/000000299207.jpg", "racket", True)
    assert item.answers[-1] == "tennis racket"
    ocr = write_json(tmp_path / "dataset.json", {
        "761183272": {"imageURL": "http://ecx.images-amazon.com/images/I/61Y5cOdHJbL.jpg",
                      "questions": ["Who wrote this book?", "Is this a comedy book?"],
                      "answers": ["Mary Engelbreit", "No"], "title": "Ink & Wit", "authorName": "Mary Engelbreit",
                      "genre": "Calendars", "genreID": 3, "split": 3},
        "1": {"imageURL": "http://x/y.png", "questions": ["Q?"], "answers": ["A"], "split": 1}})
    assert [(i.id, i.image, i.question, i.answers) for i in read_ocrvqa(ocr)] == [
        ("761183272:0", "761183272.jpg", "Who wrote this book?", ["Mary Engelbreit"]),
        ("761183272:1", "761183272.jpg", "Is this a comedy book?", ["No"])]
    assert [i.image for i in read_ocrvqa(ocr, split="train")] == ["1.png"]
    with pytest.raises(ValueError, match="split"):
        read_ocrvqa(ocr, split="dev")


# ------------------------------------------------------ batched generation == one row at a time

def noisy_tiny_model(media_attention: str = "next"):
    """Random tiny model with visible cross-attention and LoRA (every logit depends on the image)."""
    built = build_model(ModelConfig(preset="tiny", seed=0, media_attention=media_attention))
    open_gates(built.model, 0.9)
    randomize_lora_b(built.model, std=0.2)
    built.model.eval()
    return built


def question_prompts(tok) -> list[list[int]]:
    questions = ["What is in the picture?", "Colour?", "How many dogs are sitting on the red sofa today?", "Why?"]
    return [encode_prompt(Conversation([Round(q, "")], images=["x"]), tok) for q in questions]


@pytest.mark.parametrize("mode", ["next", "previous"])
def test_batched_greedy_equals_one_by_one_generate(mode):
    built = noisy_tiny_model(mode)
    model, tok = built.model, built.tokenizer
    prompts = question_prompts(tok)
    latents = model.encode_images(torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    cfg = GenerationConfig(max_new_tokens=12)
    first = generate(built, prompts[0], latents[:1], cfg)
    stop = next(t for t in first if t != first[0])
    head = model.language_model.lm_head.weight
    with torch.no_grad():  # EOS outscores a token row 0 emits later on: rows end at different steps
        head[tok.eos_token_id] = 1.05 * head[stop]
    single = [generate(built, p, latents[b:b + 1], cfg) for b, p in enumerate(prompts)]
    assert len({len(s) for s in single}) > 1 and min(map(len, single)) < cfg.max_new_tokens
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths: real left padding"
    assert generate_batch(built, prompts, latents, cfg.max_new_tokens) == single
    swapped = generate_batch(built, prompts, latents.flip(0), cfg.max_new_tokens)
    assert swapped != single, "each row must attend its own image"


def test_answer_logprobs_equal_each_row_alone():
    built = noisy_tiny_model("next")
    model, tok = built.model, built.tokenizer
    prompts = question_prompts(tok)[:2]
    latents = model.encode_images(torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    answers = [tok("red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
               tok("a dog on a sofa", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    rows = [(prompts[b], a) for b in range(2) for a in answers]
    offsets = [0, 0, 1, 1]
    batched = answer_logprobs(built, rows, latents, offsets)
    for (prompt, answer), b, value in zip(rows, offsets, batched):
        ids = torch.tensor([prompt + answer])
        media = MediaContext(latents[b:b + 1], row_layout(ids, model.image_token_id, "next"))
        with torch.no_grad():
            logp = model.lm_forward(ids, media).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        assert abs(value - float(logp.gather(1, torch.tensor(answer)[:, None]).sum())) < 1e-4


# ------------------------------------------- end to end on a model that memorised its questions

def save_picture(path: Path, colour: tuple[int, int, int], k: int) -> Path:
    img = Image.new("RGB", (40, 40), colour)
    for x in range(0, 40, 5):
        img.putpixel((x, (x * k) % 40), (255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def coco2014(image_id: int) -> str:
    return f"val2014/COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> dict[str, Path]:
    """The tiny model trained (LoRA, AdamW, the real packer and loss) on QA until it answers each
    question about its own picture, in the prompt `mmgpt eval` uses; saved as a run and exported.
    Each picture is also stored under the A-OKVQA and OCR-VQA names (same bytes, same pixels)."""
    root = tmp_path_factory.mktemp("memorised")
    images = root / "images"
    cfg = make_base(root)
    built = build_model(cfg)
    model, tok = built.model, built.tokenizer
    transform = clip_transform(SIZE)
    samples = []
    for k, ((question, answer), colour) in enumerate(zip(QA, COLOURS)):
        picture = save_picture(images / coco2014(k + 1), colour, k)
        for alias in (images / f"val2017/{k + 1:012d}.jpg", images / f"book{k}.jpg"):
            alias.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(picture, alias)
        sample = tokenize(Conversation([Round(question, answer, input=eval_cli.SHORT_ANSWER_HINT)],
                                       images=[coco2014(k + 1)]), tok, max_length=512)
        sample.images, sample.index = [load_image(images, coco2014(k + 1), transform)], k
        samples.append(sample)
    batch = collate(samples, image_token_id=model.image_token_id, media_attention=cfg.media_attention,
                    image_size=(SIZE, SIZE))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(150):
        out = packed_loss(model, model.lm_head, batch)
        loss = out.loss_sum / out.num_supervised
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01, f"the tiny model did not memorise its {len(QA)} answers (loss {loss.item():.3f})"
    run = save_run(root / "run", cfg, model)
    return {"root": root, "images": images, "run": run, "export": export(run, root / "export")}


def eval_vqa(model_dir: Path, images: Path, questions: Path, annotations: Path, output: Path,
             *extra: str) -> dict:
    argv = ["eval", "--model", str(model_dir), "--task", "vqa", "--images", str(images), "--questions",
            str(questions), "--annotations", str(annotations), "--output", str(output), "--batch-size", "4",
            "--workers", "0", *extra]
    assert main(argv) == 0
    return json.loads(output.read_text())


def memorised_vqa(root: Path, answers: list[str]) -> tuple[Path, Path]:
    """The training questions with ten humans giving `answers[k]`, plus two whose image is missing
    or corrupt."""
    corrupt = root / "images" / coco2014(101)
    corrupt.write_bytes(b"not a jpeg at all")
    pairs = [(k + 1, q, [a] * 10) for k, ((q, _), a) in enumerate(zip(QA, answers))]
    pairs += [(100, "What is missing?", ["x"] * 10), (101, "Is it corrupt?", ["y"] * 10)]
    return vqa_files(root / "vqa", pairs, name=f"v2_{answers[0]}")


def test_eval_vqa_memorised_model_near_perfect_and_near_zero_on_shuffled_answers(memorised, tmp_path):
    root, images, out = memorised["root"], memorised["images"], memorised["export"]
    truth = [a for _, a in QA]
    report = eval_vqa(out, images, *memorised_vqa(root, truth), tmp_path / "vqa.json", "--update-card")
    assert report["metrics"]["accuracy"] >= 0.9, report["predictions"]
    assert report["n"] == len(QA)
    assert report["skipped"]["count"] == 2
    assert report["skipped"]["reasons"] == {"missing_image": 1, "corrupt_image": 1}
    by_id = {p["id"]: p for p in report["predictions"]}
    assert by_id[10]["question"] == QA[0][0] and by_id[10]["answers"] == ["red"] * 10
    assert report["config"]["model"]["media_attention"] == "next" and report["config"]["args"]["task"] == "vqa"
    manifest = json.loads((out / "manifest.json").read_text())
    weights = "adapter/adapter_model.safetensors"
    assert report["model_hashes"]["files"][weights] == manifest["files"][weights]["sha256"]
    assert report["timing"]["eval_s"] > 0 and report["prompt"]["hint"] == eval_cli.SHORT_ANSWER_HINT
    card = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert card["mmgpt"]["eval"]["vqa"] == {"accuracy": round(report["metrics"]["accuracy"], 4), "n": 6, "skipped": 2}
    assert card["mmgpt"]["preset"] == "tiny", "the rest of the card stays"

    shuffled = truth[1:] + truth[:1]  # every question gets another question's answer
    report = eval_vqa(memorised["run"], images, *memorised_vqa(root, shuffled), tmp_path / "shuffled.json")
    assert report["metrics"]["accuracy"] <= 0.2, report["predictions"]
    assert report["model_hashes"]["from"] == "hashed" and "adapter_model.safetensors" in report["model_hashes"]["files"]


def other_task_args(task: str, data: Path) -> list[str]:
    if task == "aokvqa":
        records = [aokvqa_record(f"q{k}", k + 1, q, [a for _, a in QA[:4]] + ([a] if k >= 4 else []),
                                 min(k, 4), [a] * 10) for k, (q, a) in enumerate(QA)]
        return ["--data", str(write_json(data / "aokvqa_v1p0_val.json", records))]
    if task == "ocrvqa":
        books = {f"book{k}": {"imageURL": f"http://x/I/{k}.jpg", "questions": [q], "answers": [a.capitalize()],
                              "split": 3} for k, (q, a) in enumerate(QA)}
        return ["--data", str(write_json(data / "dataset.json", books))]
    captions = [{"image": coco2014(k + 1), "caption": [f"a picture of {a}", f"{a} in a photo"]}
                for k, (_, a) in enumerate(QA)]
    return ["--data", str(write_json(data / "coco_karpathy_test.json", captions)), "--no-meteor"]


@pytest.mark.parametrize("task,expected", [("aokvqa", {"mc_accuracy": 0.9, "da_accuracy": 0.9}),
                                           ("ocrvqa", {"exact_match": 0.9}), ("coco_caption", {})])
def test_eval_other_tasks_end_to_end(memorised, tmp_path, task, expected):
    if task == "coco_caption" and shutil.which("java") is None:
        pytest.skip("needs Java: the COCO caption evaluation's PTB tokenizer")
    argv = ["eval", "--model", str(memorised["run"]), "--task", task, "--images", str(memorised["images"]),
            "--output", str(tmp_path / "r.json"), "--workers", "0", *other_task_args(task, tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == len(QA) and report["skipped"]["count"] == 0
    for name, at_least in expected.items():
        assert report["metrics"][name] >= at_least, report["predictions"]
    if task == "coco_caption":  # an untrained captioner: the scores exist, whatever they are
        assert {"CIDEr", "Bleu_4"} <= report["metrics"].keys()
        assert report["prompt"]["hint"] == "" and report["predictions"][0]["question"] == CAPTION_PROMPT
    if task == "aokvqa":
        assert all(len(p["choice_scores"]) == len(p["choices"]) for p in report["predictions"])


def test_two_gloo_ranks_give_the_single_process_predictions(memorised, tmp_path):
    """torchrun, two CPU processes: each evaluates every other item, rank 0 gathers and reports."""
    root, images = memorised["root"], memorised["images"]
    files = memorised_vqa(root, [a for _, a in QA])
    single = eval_vqa(memorised["run"], images, *files, tmp_path / "single.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmgpt.cli",
            "eval", "--model", str(memorised["run"]), "--task", "vqa", "--images", str(images),
            "--questions", str(files[0]), "--annotations", str(files[1]), "--output", str(tmp_path / "two.json"),
            "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["config"]["world_size"] == 2
    key = lambda p: str(p["id"])  # noqa: E731
    assert sorted(two["predictions"], key=key) == sorted(single["predictions"], key=key)
    assert two["metrics"] == single["metrics"] and two["skipped"]["count"] == single["skipped"]["count"]


def test_parser_task_names_are_the_tasks():
    assert eval_cli.TASK_NAMES == tuple(sorted(TASKS))


# ------------------------------------------------------------- few-shot, OpenFlamingo's format

def test_fewshot_prompt_ids_are_openflamingos_format(tiny_tokenizer):
    tok = tiny_tokenizer
    demos = [EvalItem(1, "a.jpg", "What colour is the bus?", ["red", "dark red"]),
             EvalItem(2, "b.jpg", "Is it raining?", ["no"])]
    query = EvalItem(3, "c.jpg", "How many cats?", ["two"])
    vqa = ("<image>Question:What colour is the bus? Short answer:red<|endofchunk|>\n"
           "<image>Question:Is it raining? Short answer:no<|endofchunk|>\n"
           "<image>Question:How many cats? Short answer:")
    assert fewshot.fewshot_text("vqa", demos, query) == vqa
    captions = [EvalItem(1, "a.jpg", CAPTION_PROMPT, [" A red bus. ", "a bus"])]
    caption = "<image>Output:A red bus.<|endofchunk|>\n<image>Output:"
    assert fewshot.fewshot_text("caption", captions, query) == caption
    for kind, shown, text in (("vqa", demos, vqa), ("caption", captions, caption)):
        ids = fewshot.fewshot_ids(kind, shown, query, tok)
        assert ids == tok(text)["input_ids"] and ids[0] == tok.bos_token_id
        assert ids.count(tok.convert_tokens_to_ids("<image>")) == len(shown) + 1
        assert ids.count(tok.convert_tokens_to_ids("<|endofchunk|>")) == len(shown)
    assert fewshot.postprocess_vqa("red, blue Question:x") == "red"
    assert fewshot.postprocess_caption('a "red" bus Output:') == "a red bus "


def test_fewshot_demonstrations_are_seeded_from_the_train_pool():
    pool = [EvalItem(k, f"{k}.jpg", "q", ["a"]) for k in range(20)]
    items = [EvalItem(100 + k, f"{k}.jpg", "q", ["a"]) for k in range(5)]  # share images with the pool
    draw = fewshot.draw_demos(pool, items, 4, seed=42, query_set_size=2048)
    assert draw == fewshot.draw_demos(pool, items, 4, seed=42, query_set_size=2048)
    assert draw != fewshot.draw_demos(pool, items, 4, seed=43, query_set_size=2048)
    assert all(len({d.id for d in demos}) == 4 and item.image not in {d.image for d in demos}
               for item, demos in zip(items, draw))
    with pytest.raises(ValueError, match="--shots 30: only 19 demonstrations"):
        fewshot.draw_demos(pool, items, 30, seed=42, query_set_size=2048)


def ocrvqa_books(root: Path) -> Path:
    """The memorised pictures as OCR-VQA books: the first three in the train split, the rest test."""
    books = {f"book{k}": {"imageURL": f"http://x/I/{k}.jpg", "questions": [q], "answers": [a],
                          "split": 1 if k < 3 else 3} for k, (q, a) in enumerate(QA)}
    return write_json(root / "dataset.json", books)


def one_by_one(built, ids: list[int], images: list[str], root: Path, cut: int | None) -> str:
    """`generate` on one prompt; greedy tokens up to the first `cut` token (the stop) decoded."""
    assert built.media_attention == "next"
    pixels = torch.stack([load_image(root, image, clip_transform(SIZE)) for image in images])
    new = generate(built, ids, built.model.encode_images(pixels), GenerationConfig(max_new_tokens=16))
    return built.tokenizer.decode(new[:new.index(cut)] if cut in new else new, skip_special_tokens=True)


def test_fewshot_eval_equals_generate_on_the_format_and_zero_shots_is_the_instruction_prompt(memorised, tmp_path):
    """`--shots 2` (ocrvqa, demonstrations from its train split): each prediction equals `generate`
    on the text OpenFlamingo's format gives, with the demonstrations' images first, cut at
    <|endofchunk|> and post-processed; `--shots 0` equals `generate` on the training rendering."""
    from mmgpt.inference.model_dir import load_model, resolve_source

    data = ocrvqa_books(tmp_path)
    images = memorised["images"]
    built = load_model(resolve_source(str(memorised["run"])), device="cpu", dtype=torch.float32)
    tok = built.tokenizer
    by_id = {i.id: i for i in read_ocrvqa(data, "train")}
    reports = {}
    for shots in (0, 2):
        argv = ["eval", "--model", str(memorised["run"]), "--task", "ocrvqa", "--images", str(images),
                "--data", str(data), "--output", str(tmp_path / f"{shots}.json"), "--workers", "0",
                "--batch-size", "2", "--max-new-tokens", "16", "--shots", str(shots)]
        assert main(argv) == 0
        reports[shots] = json.loads((tmp_path / f"{shots}.json").read_text())
    assert reports[2]["prompt"]["format"] == "openflamingo_vqa" and reports[2]["n"] == len(QA) - 3
    endofchunk = tok.convert_tokens_to_ids("<|endofchunk|>")
    for pred in reports[2]["predictions"]:
        demos = [by_id[d] for d in pred["demonstrations"]]
        assert len(demos) == 2 and all(d.id.startswith(("book0:", "book1:", "book2:")) for d in demos)
        query = EvalItem(pred["id"], pred["image"], pred["question"], pred["answers"])
        ids = tok(fewshot.fewshot_text("vqa", demos, query))["input_ids"]
        text = one_by_one(built, ids, [d.image for d in demos] + [query.image], images, endofchunk)
        assert pred["prediction"] == fewshot.postprocess_vqa(text).strip()
    for pred in reports[0]["predictions"]:
        assert "demonstrations" not in pred
        conversation = Conversation([Round(pred["question"], "", input=eval_cli.SHORT_ANSWER_HINT)], [pred["image"]])
        text = one_by_one(built, encode_prompt(conversation, tok), [pred["image"]], images, None)
        assert pred["prediction"] == text.strip()


def test_fewshot_refuses_a_task_outside_openflamingos_suite(memorised, tmp_path, capsys):
    argv = ["eval", "--model", str(memorised["run"]), "--task", "aokvqa", "--images", str(memorised["images"]),
            "--workers", "0", "--shots", "2", *other_task_args("aokvqa", tmp_path)]
    assert main(argv) != 0
    assert "--task aokvqa is not in OpenFlamingo's few-shot suite" in capsys.readouterr().err
