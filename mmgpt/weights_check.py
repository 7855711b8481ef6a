"""`mmgpt weights check CONFIG`: what each weight path of a run's `model:` section holds, in seconds.

For each path: the form found, tensor count, dtypes, and whether it fits the preset (the LLaMA
config against the preset's sizes, the LoRA settings a MultiModal-GPT file carries against
`model.lora`), then one verdict line. Nothing large is loaded: safetensors headers, torch zip
files onto the meta device, the TorchScript pickle without its storages, config.json files; only the
small LoRA file is read whole. The fit checks are preflight's, so what passes here loads.
"""
from __future__ import annotations

import json
from pathlib import Path


from mmgpt.train.config import TrainConfig
from mmgpt.models.builder import ModelConfig, get_preset
from mmgpt.models.clip_forms import read_clip_weights
from mmgpt.models.pretrained import (WeightsError, load_state_file, read_meta_state, tensor_summary,
                                     tuning_settings, unwrap)
from mmgpt.preflight import llama_config_problems, meta_model, model_path_problems, weight_problems


def llama_line(path: str) -> str:
    """Form (sharded or not, .bin or safetensors), tensor count from the index or header, tokenizer form."""
    root = Path(path)
    index = next(iter(sorted(root.glob("*.index.json"))), None)
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        weights = f"{len(set(weight_map.values()))} {files[0].suffix} shards, {len(weight_map)} tensors"
    else:
        weights = f"one {files[0].suffix} file, {tensor_summary(read_meta_state(files[0]))}"
    config = json.loads((root / "config.json").read_text())
    tokenizer = "tokenizer.json" if (root / "tokenizer.json").is_file() else "tokenizer.model only (sentencepiece)"
    return (f"llama_path {path}: transformers LLaMA dir, {weights}; config dtype "
            f"{config.get('torch_dtype') or config.get('dtype') or 'unset'}; hidden {config.get('hidden_size')} x "
            f"{config.get('num_hidden_layers')} layers, vocab {config.get('vocab_size')}; tokenizer {tokenizer}")


def file_lines(cfg: ModelConfig) -> list[str]:
    """One line per weight path: what it is."""
    lines = []
    if cfg.llama_path:
        lines.append(llama_line(cfg.llama_path))
    if cfg.clip_weights:
        weights = read_clip_weights(cfg.clip_weights, meta=True)
        lines.append(f"clip_weights {weights.describe()}")
    if cfg.openflamingo_checkpoint:
        state = unwrap(read_meta_state(cfg.openflamingo_checkpoint))
        lines.append(f"openflamingo_checkpoint {cfg.openflamingo_checkpoint}: {tensor_summary(state)}")
    if cfg.lora_checkpoint:
        raw = load_state_file(cfg.lora_checkpoint)  # small: read whole, through the restricted unpickler
        settings = tuning_settings(raw, cfg.lora_checkpoint)
        lines.append(f"lora_checkpoint {cfg.lora_checkpoint}: MultiModal-GPT LoRA file, {tensor_summary(unwrap(raw))}; "
                     f"tuning_config {settings or 'absent'}")
    return lines


def check(cfg: ModelConfig, where: str) -> tuple[list[str], list[str]]:
    """(what each file is, every problem): paths first, then forms, then the fit to the preset."""
    problems = model_path_problems(cfg, where)
    if problems:
        return [], problems
    try:
        lines = file_lines(cfg)
    except WeightsError as err:
        return [], [str(err)]
    if cfg.llama_path:
        problems += llama_config_problems(cfg.llama_path, cfg.preset, get_preset(cfg.preset).llama)
    model, build_problems = meta_model(cfg)
    problems += build_problems
    if model is not None:
        problems += weight_problems(cfg, model)
    return lines, problems


def report(config: Path) -> tuple[list[str], bool]:
    """The report's lines (files, problems, verdict) and whether every file fits."""
    cfg = TrainConfig.load(config).model
    lines, problems = check(cfg, str(config))
    given = sum(bool(p) for p in (cfg.llama_path, cfg.clip_weights, cfg.openflamingo_checkpoint, cfg.lora_checkpoint))
    verdict = "ok" if not problems else f"{len(problems)} problem(s)"
    lines += [f"problem: {' '.join(p.split())}" for p in problems]
    lines.append(f"weights check: {verdict} ({given} weight path(s), preset {cfg.preset!r}, lora {cfg.lora!r})")
    return lines, not problems

