"""The command line is fast and says what is wrong in one line (issue 12 items 1-3):
`mmgpt --help` imports no model stack; user errors are one line and exit 2 for every subcommand,
with the traceback under --debug; launch_check lists every missing or misfitting file at once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
HEAVY = ("torch", "transformers", "deepspeed", "peft", "gradio")


def mmgpt(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmgpt.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_parser_and_help_import_no_model_stack():
    code = ("import sys, contextlib, io, mmgpt.cli as cli\n"
            "parser = cli.build_parser()\n"
            "for argv in (['--help'], ['chat', '--help'], ['serve', '--help'], ['export', '--help'],\n"
            "             ['train', '--help'], ['params', '--help'], ['plan', '--help'], ['bench', 'packing', '--help'],\n"
            "             ['data', 'inspect', '--help']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        parser.parse_args(argv)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_is_fast_and_shows_defaults():
    start = time.perf_counter()
    result = mmgpt("--help")
    elapsed = time.perf_counter() - start
    print(f"mmgpt --help: {elapsed:.2f} s")
    assert result.returncode == 0 and "chat" in result.stdout
    assert elapsed < 2.0  # was ~10 s (every command imported torch/transformers); < 1 s unloaded
    chat = mmgpt("chat", "--help").stdout
    assert "(default: 256)" in chat and "(default: auto)" in chat
    assert "(default: 9b)" in mmgpt("params", "--help").stdout
    assert "(default: none)" in mmgpt("train", "--help").stdout  # --resume


def test_dtype_choices_match_the_loader():
    from mmgpt.names import DTYPE_NAMES
    from mmgpt.inference.model_dir import DTYPES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)


# argv per case; "{tmp}" is the test's directory, holding the files `_write_bad_inputs` writes
USER_ERRORS = {
    "params unknown preset": ["params", "--preset", "13b"],
    "params unknown lora": ["params", "--preset", "tiny", "--lora", "wide"],
    "data inspect missing file": ["data", "inspect", "--config", "{tmp}/missing.yaml"],
    "data inspect bad YAML": ["data", "inspect", "--config", "{tmp}/mix.yaml"],
    "data inspect missing tokenizer": ["data", "inspect", "--config", "{tmp}/mix.yaml", "--tokenizer", "{tmp}/no"],
    "data sample bad count": ["data", "sample", "--out", "{tmp}/s", "--n", "0"],
    "train missing file": ["train", "--config", "{tmp}/missing.yaml"],
    "train bad YAML": ["train", "--config", "{tmp}/bad.yaml"],
    "export missing dir": ["export", "--checkpoint", "{tmp}/nope", "--out", "{tmp}/o"],
    "export bad JSON": ["export", "--checkpoint", "{tmp}/run", "--out", "{tmp}/o"],
    "chat missing model and image": ["chat", "--model", "{tmp}/nope", "--image", "{tmp}/no.png"],
    "chat bad JSON": ["chat", "--model", "{tmp}/run", "--prompt", "hi"],
    "serve missing model": ["serve", "--model", "{tmp}/nope"],
    "bench unknown preset": ["bench", "packing", "--preset", "13b", "--samples", "4", "--steps", "1"],
    "plan unknown gpu": ["plan", "--config", str(REPO / "configs" / "mmgpt_9b.yaml"), "--gpu", "a100"],
    "plan missing file": ["plan", "--config", "{tmp}/missing.yaml", "--gpu", "h200"],
}


def _write_bad_inputs(tmp: Path) -> None:
    (tmp / "bad.yaml").write_text("mixture: [unclosed\n")
    (tmp / "mix.yaml").write_text("sources: {oops")
    (tmp / "run").mkdir()
    (tmp / "run" / "mmgpt_config.json").write_text("{not json")


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_user_errors_are_one_line(tmp_path, name, monkeypatch, capsys):
    """Through `mmgpt.cli.main` in this process: the entry point's own code path (the subprocess
    tests around this one cover the real executable)."""
    from mmgpt.cli import main

    _write_bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in USER_ERRORS[name]]
    code = main(argv)
    stderr = capsys.readouterr().err
    assert code == 2, (name, stderr[-2000:])
    assert "Traceback" not in stderr, (name, stderr[-2000:])
    lines = stderr.strip().splitlines()
    command = " ".join(argv[:2]) if argv[0] in ("data", "bench") else argv[0]
    assert lines and all(line.startswith(f"mmgpt {command}: error: ") for line in lines), (name, stderr)
    expected_lines = 2 if name == "chat missing model and image" else 1  # every problem, one line each
    assert len(lines) == expected_lines, (name, stderr)


def test_debug_shows_the_traceback():
    result = mmgpt("--debug", "params", "--preset", "13b")
    assert result.returncode != 0 and "Traceback" in result.stderr and "unknown model preset" in result.stderr


def test_normal_runs_hide_library_warnings():
    quiet, loud = mmgpt("params", "--preset", "tiny"), mmgpt("--debug", "params", "--preset", "tiny")
    assert quiet.returncode == 0 and "total_params" in quiet.stdout
    assert "FutureWarning" not in quiet.stderr
    assert "FutureWarning" in loud.stderr  # transformers' is_gradient_checkpointing deprecation


# ---------------------------------------------------------------- launch_check preflight


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmgpt.train.launch_check", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_launch_check_lists_every_missing_path(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"""mixture: mix.yaml
output_dir: out
model: {{preset: tiny, llama_path: w/llama, clip_weights: w/clip.pt, openflamingo_checkpoint: w/of.pt,
         lora_checkpoint: w/lora.pt}}
""")
    (tmp_path / "mix.yaml").write_text("sources:\n- {name: a, type: dolly, path: a.jsonl}\n"
                                        "- {name: b, type: llava, path: b.json, image_root: imgs}\n")
    result = run_check("--config", str(config), "--num-gpus", "2")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("launch_check: error: ") for line in lines), result.stderr
    for needle in ("llama_path (LLaMA directory) not found", "clip_weights not found", "openflamingo_checkpoint not found",
                   "lora_checkpoint not found", "source 'a': file not found", "source 'b': file not found",
                   "source 'b': image_root not found"):
        assert sum(needle in line for line in lines) == 1, (needle, result.stderr)
    assert len(lines) == 7 and "Traceback" not in result.stderr
    assert "deepspeed.launcher" not in result.stdout + result.stderr


def test_launch_check_reports_checkpoint_shapes_that_disagree_with_the_preset(tmp_path):
    import torch
    from safetensors.torch import save_file

    from mmgpt.models.builder import ModelConfig, build_model
    from mmgpt.models.pretrained import is_openflamingo_weight

    model = build_model(ModelConfig(preset="tiny", lora="none")).model
    state = model.state_dict()  # the module's own OrderedDict, reduced to what OpenFlamingo saves
    for name in [k for k in state if not is_openflamingo_weight(k)]:
        del state[name]
    key = next(k for k in state if k.startswith("perceiver."))
    save_file(dict(state), str(tmp_path / "of.safetensors"))
    state[key] = torch.zeros(*[d + 1 for d in state[key].shape])  # the 'small' preset's, say
    torch.save(state, tmp_path / "of.pt")
    clip = torch.nn.Module()  # an open_clip-named CLIP whose visual tower is the preset's, one tensor broken
    clip.visual = model.vision_encoder.visual
    clip = clip.state_dict()
    clip["visual.conv1.weight"] = torch.zeros(1, 1)
    torch.save(clip, tmp_path / "clip.pt")
    (tmp_path / "a.jsonl").write_text('{"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}\n')  # one usable record: an empty mixture is refused too
    (tmp_path / "mix.yaml").write_text("sources:\n- {name: a, type: dolly, path: a.jsonl}\n")
    config = tmp_path / "run.yaml"
    config.write_text("mixture: mix.yaml\noutput_dir: out\n"
                      "model: {preset: tiny, clip_weights: clip.pt, openflamingo_checkpoint: of.pt}\n")
    result = run_check("--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert "of.pt" in lines[1] and "1 shape mismatches" in lines[1] and key in lines[1]
    assert "clip.pt: CLIP vision weights do not fit" in lines[0] and "conv1.weight" in lines[0]

    config.write_text("mixture: mix.yaml\noutput_dir: out\nmodel: {preset: tiny, openflamingo_checkpoint: of.safetensors}\n")
    ok = run_check("--config", str(config))
    assert ok.returncode == 0 and "launch_check: ok" in ok.stdout, ok.stderr


@pytest.mark.parametrize("name, ds, message", [
    ("offload string", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
     "zero_optimization.offload_optimizer must be an object, got 'cpu'"),
    ("bf16 string", {"bf16": {"enabled": "false"}, "fp16": {"enabled": True}},
     "bf16.enabled must be true or false (JSON booleans, no quotes), got 'false'"),
])
def test_launch_check_ds_gaps_name_the_file(tmp_path, name, ds, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    result = run_check("--ds-config", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(path) in lines[0] and message in lines[0]


@pytest.mark.parametrize("content, message", [
    (b"node-a slots=2\nnode-\xff slots=2\n", "hosts:2: hostfile is not UTF-8 text"),
    ("node-a slots=\u00b2\n".encode(), "hosts:1: slots must be a positive integer, got '\u00b2'"),
])
def test_launch_check_hostfile_gaps_name_the_file(tmp_path, content, message):
    (tmp_path / "hosts").write_bytes(content)
    result = run_check("--hostfile", str(tmp_path / "hosts"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_launch_check_refuses_an_invalid_mixture(tmp_path):
    (tmp_path / "mix.json").write_text('{"sources": [')
    config = tmp_path / "run.yaml"
    config.write_text("mixture: mix.json\noutput_dir: out\n")
    result = run_check("--config", str(config))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "mix.json: not valid YAML/JSON" in lines[0], result.stderr


def test_jit_build_notice(tmp_path, monkeypatch):
    from mmgpt.train.ds_config import jit_build_notice

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert jit_build_notice({}, cuda=True) is None
    notice = jit_build_notice(offload, cuda=False)
    assert "deepspeed_shm_comm" in notice and "cpu_adam" in notice and str(tmp_path) in notice
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert "deepspeed_shm_comm" not in jit_build_notice(offload, cuda=False)
    assert jit_build_notice({}, cuda=False) is None
