"""`mmgpt weights check CONFIG` on a tiny run whose four weight paths are each in a form users hold:
a 2023 sharded-.bin LLaMA dir, OpenAI's TorchScript CLIP archive, OpenFlamingo's checkpoint.pt and the
released MultiModal-GPT LoRA file (all written by their real writers, see the tests they come from)."""
from __future__ import annotations

import re

import pytest
import torch

from mmgpt.cli import main
from test_clip_forms import open_clip_model, IMAGES
from test_llama_dir import write_2023_llama_dir
from test_pretrained import openflamingo_v1, released_file, save_with_mmengine, source_model


def write_weights(root) -> None:
    (root / "llama").mkdir()
    write_2023_llama_dir(root / "llama")
    clip, text = open_clip_model(), torch.zeros(1, 8, dtype=torch.long)
    traced = torch.jit.trace_module(clip, {"encode_image": IMAGES[:1], "encode_text": text}, check_trace=False)
    torch.jit.save(traced, str(root / "ViT-L-14.pt"))
    torch.save(openflamingo_v1()[1], root / "checkpoint.pt")
    save_with_mmengine(released_file, source_model(), root / "mmgpt-lora-v0-release.pt", "legacy")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    write_weights(root)
    return root


def config(root, lora: str = "default"):
    path = root / "run.yaml"
    path.write_text("mixture: mix.yaml\noutput_dir: out\nmodel:\n  preset: tiny\n  llama_path: llama\n"
                    "  clip_weights: ViT-L-14.pt\n  openflamingo_checkpoint: checkpoint.pt\n"
                    f"  lora_checkpoint: mmgpt-lora-v0-release.pt\n  lora: {lora}\n")
    return path


def test_weights_check_reports_every_form_and_the_fit(weights_dir, capsys):
    assert main(["weights", "check", str(config(weights_dir))]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert re.search(r"^llama_path .*: transformers LLaMA dir, \d+ \.bin shards, 39 tensors; config dtype .*"
                     r"hidden 64 x 4 layers, vocab 1000; tokenizer tokenizer.model only", lines[0])
    assert re.search(r"^clip_weights .*ViT-L-14.pt: CLIP ViT in torchscript form, \d+ tensors \(float32 x\d+\)$",
                     lines[1])
    assert re.search(r"^openflamingo_checkpoint .*checkpoint.pt: \d+ tensors \(float32", lines[2])
    assert re.search(r"^lora_checkpoint .*: MultiModal-GPT LoRA file, 52 tensors \(float32 x52\); tuning_config "
                     r"\{'lora': True, 'lora_r': 16, 'lora_alpha': 16", lines[3])
    assert lines[-1] == "weights check: ok (4 weight path(s), preset 'tiny', lora 'default')"


def test_weights_check_names_what_does_not_fit(weights_dir, capsys):
    assert main(["weights", "check", str(config(weights_dir, "{r: 8}"))]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("problem: ") and "tuning_config disagrees with the model: lora_r=16" in line
               for line in lines)
    assert lines[-1].startswith("weights check: 1 problem(s)")
