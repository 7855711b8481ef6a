"""`model.lora`: a preset name or a `{preset, r, alpha, dropout, targets}` mapping (YAML and Python), and
its values reaching peft, the adapter's adapter_config.json, `mmgpt params` and the released-file check."""
from __future__ import annotations

import json
import re

import pytest
import torch

from mmgpt.cli import main
from mmgpt.train.config import TrainConfig
from mmgpt.configfile import ConfigError
from mmgpt.models.builder import ModelConfig, build_model
from mmgpt.models.lora import LORA_PRESETS, LoraSpec
from mmgpt.models.pretrained import WeightsError, load_lora
from mmengine_standins import fake_mmengine, lora_config

YAML = ("mixture: mix.yaml\noutput_dir: out\nmodel:\n  preset: tiny\n"
        "  lora: {preset: default, r: 4, alpha: 8, dropout: 0.05, targets: [q_proj, v_proj, to_kv]}\n")
D, LAYERS, XATTN = 64, 4, 2  # tiny: hidden 64, 4 layers, cross-attention every 2nd


def lora_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def test_yaml_mapping_reaches_peft_and_the_adapter_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    cfg = TrainConfig.load(path)
    assert cfg.model.lora == LoraSpec("default", r=4, alpha=8, dropout=0.05, targets=("q_proj", "v_proj", "to_kv"))
    model = build_model(cfg.model).model
    peft = model.lang_encoder.peft_config["default"]
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (4, 8, 0.05)
    adapted = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.endswith((".q_proj", ".v_proj", ".to_kv"))
               and hasattr(_, "lora_A")}
    assert adapted == {"q_proj", "v_proj", "to_kv"}
    # q/v: 64 -> 64 in every layer; to_kv: 64 (vision width) -> 2 x heads x dim_head (2 x 2 x 16) per block
    assert lora_numel(model) == 2 * LAYERS * 4 * (D + D) + XATTN * 4 * (D + 64)
    model.lang_encoder.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 8, 0.05)
    assert re.search(r"self_attn\\?\.q_proj", saved["target_modules"]) and "k_proj" not in saved["target_modules"]
    TrainConfig.load(path).save(tmp_path / "config.yaml")  # the run's config.yaml reads back the same
    assert TrainConfig.load(tmp_path / "config.yaml").model.lora == cfg.model.lora


def test_preset_names_and_partial_mappings_resolve_to_the_presets_values():
    assert LoraSpec().resolved() == LORA_PRESETS["default"]
    assert LoraSpec("paper", r=8).resolved() == LoraSpec("paper", 8, 16, 0.0, LORA_PRESETS["paper"].targets)
    default = build_model(ModelConfig(preset="tiny"), meta=True).model
    same = build_model(ModelConfig(preset="tiny", lora=LoraSpec()), meta=True).model
    assert lora_numel(default) == lora_numel(same) > 0


@pytest.mark.parametrize("lora, message", [
    ("big", "unknown LoRA preset 'big'"),
    ("{targets: [q_proj, mlp]}", "LoRA targets ['mlp'] unknown"),
    ("{r: 0}", "LoRA r must be >= 1"),
    ("{rank: 4}", "unknown key(s) ['rank']"),
])
def test_bad_lora_settings_are_one_line_errors(tmp_path, lora, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"mixture: m.yaml\noutput_dir: o\nmodel: {{preset: tiny, lora: {lora}}}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.load(path)


def test_params_counts_the_configured_lora(capsys):
    assert main(["params", "--preset", "tiny", "--lora", "{r: 8}"]) == 0
    half = capsys.readouterr().out
    assert main(["params", "--preset", "tiny", "--lora", "default"]) == 0
    full = capsys.readouterr().out
    count = [int(re.search(r"lora_params: ([\d,]+)", out)[1].replace(",", "")) for out in (half, full)]
    assert count[0] * 2 == count[1] and "lora: default r=8 alpha=16" in half


def test_released_file_refused_by_a_configured_rank(tmp_path):
    """A file trained with the released r=16 does not fit r=8: refused naming the field."""
    src = build_model(ModelConfig(preset="tiny", seed=1)).model
    path = tmp_path / "mmgpt-lora-v0-release.pt"
    with fake_mmengine("legacy"):
        torch.save({"model_state_dict": src.state_dict(), "tuning_config": lora_config().tuning_config}, path)
    model = build_model(ModelConfig(preset="tiny", lora=LoraSpec(r=8))).model
    with pytest.raises(WeightsError, match=r"tuning_config disagrees with the model: lora_r=16 but .* \[8\]"):
        load_lora(model, path)


def test_configured_lora_reaches_the_export_and_its_model_card(tmp_path):
    """An adapter export of a run trained with `lora: {r: 4, alpha: 8, ...}` carries those values in
    adapter_config.json, mmgpt_config.json and the model card, and loads back to the same LoRA."""
    import yaml
    from dataclasses import replace

    from mmgpt.export import export
    from mmgpt.inference.model_dir import load_model, resolve_source
    from test_export import make_base, save_run

    spec = LoraSpec("default", r=4, alpha=8, dropout=0.05, targets=("q_proj", "v_proj", "to_kv"))
    cfg = replace(make_base(tmp_path), lora=spec)
    model = build_model(cfg).model
    out = export(save_run(tmp_path / "run", cfg, model), tmp_path / "out", merge=False, dtype_name="fp32")
    adapter = json.loads(next(out.rglob("adapter_config.json")).read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8, 0.05)
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert card["mmgpt"]["lora"]["r"] == 4 and card["mmgpt"]["lora"]["alpha"] == 8
    reloaded = load_model(resolve_source(out)).model
    assert lora_numel(reloaded) == lora_numel(model)
    assert reloaded.lang_encoder.peft_config["default"].r == 4
