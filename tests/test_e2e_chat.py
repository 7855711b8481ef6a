"""End to end: train the tiny preset's LoRA on a few bundled samples until it memorises them
(in-process AdamW on the packed forward, no DeepSpeed), save an OUT-like dir, `mmgpt export
--merge`, then `mmgpt chat --prompt` with a trained image + question prints the trained answer
(greedy). Two images, one question, two answers: the answer has to come through the image."""
from __future__ import annotations

from pathlib import Path

import torch
from test_export import make_base, save_run

from mmgpt.cli import main
from mmgpt.data.conversation import Conversation, tokenize
from mmgpt.data.images import load_image
from mmgpt.image_transform import clip_transform
from mmgpt.data.packing import collate
from mmgpt.data.sample import write_sample
from mmgpt.data.sources import READERS
from mmgpt.models.builder import build_model, preset_image_size
from mmgpt.train.loss import packed_loss

SIZE = preset_image_size("tiny")
MAX_STEPS = 400
TARGET_LOSS = 0.005  # mean cross-entropy per supervised token


def bundled_samples(root: Path) -> tuple[list[tuple[Conversation, Path]], Conversation]:
    """The bundled dataset's COCO caption records (with their image files) and one Dolly record."""
    write_sample(root, records=40, image_size=SIZE)
    coco = READERS["coco_caption"](root / "coco/annotations/captions_train2017.json", source="coco", seed=0)
    image_root = root / "coco/images/train2017"
    vl = [(c, image_root / c.images[0]) for c in coco.conversations[:2]]
    dolly = READERS["dolly"](root / "dolly/databricks-dolly-15k.jsonl", source="dolly", seed=0)
    text = min((c for c in dolly.conversations if not c.rounds[0].input), key=lambda c: len(c.rounds[0].response))
    return vl, text


def train_until_memorised(model, tok, conversations: list[Conversation], image_root: Path) -> float:
    transform = clip_transform(SIZE)
    samples = []
    for conv in conversations:
        sample = tokenize(conv, tok, max_length=512)
        assert not isinstance(sample, str), sample
        sample.images = [load_image(image_root, rel, transform) for rel in conv.images]
        samples.append(sample)
    batch = collate(samples, image_token_id=model.image_token_id, image_size=(SIZE, SIZE))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(MAX_STEPS):
        out = packed_loss(model, model.lm_head, batch)
        loss = out.loss_sum / out.num_supervised
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < TARGET_LOSS:
            break
    return loss.item()


def test_trained_answer_comes_back_through_export_and_chat(tmp_path, capsys):
    vl, text = bundled_samples(tmp_path / "data")
    # same question, different images and answers: only the image can tell the answers apart
    vl[1][0].rounds[0].instruction = vl[0][0].rounds[0].instruction
    assert vl[0][0].rounds[0].response != vl[1][0].rounds[0].response
    cfg = make_base(tmp_path)
    built = build_model(cfg)
    model, tok = built.model, built.tokenizer
    image_root = vl[0][1].parent
    loss = train_until_memorised(model, tok, [c for c, _ in vl] + [text], image_root)
    assert loss < TARGET_LOSS, f"did not memorise in {MAX_STEPS} steps (loss {loss:.4f})"
    run = save_run(tmp_path / "run", cfg, model)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(out),
                                    "--merge", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    for conv, image in vl:
        rnd = conv.rounds[0]
        assert tok.decode(tok(rnd.response, add_special_tokens=False)["input_ids"]) == rnd.response.strip()
        assert main(["chat", "--model", str(out), "--image", str(image),
                                      "--prompt", rnd.instruction, "--max-new-tokens", "40"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == rnd.response.strip()
    rnd = text.rounds[0]
    assert main(["chat", "--model", str(out), "--prompt", rnd.instruction]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == rnd.response.strip()


def test_chat_errors_name_the_problem(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "no-such-dir"), "--prompt", "hi"]) == 2
    assert "no-such-dir" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {preset: tiny, lora_rank: 3}\n")
    assert main(["chat", "--model", str(tmp_path / "run"), "--prompt", "hi"]) == 2
    assert "config.yaml" in capsys.readouterr().err
