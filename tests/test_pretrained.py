"""Strict loading of OpenFlamingo v1/v2 and released MultiModal-GPT LoRA layouts (tiny dims).

Each test writes a file in the original key layout from one model (seed 1) and loads it into
another (seed 2) built from a different seed, then checks the weights were reproduced exactly.
MultiModal-GPT files carry an mmengine tuning_config, written here through `mmengine_standins`.
"""
from __future__ import annotations

import builtins
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import open_clip.model
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmgpt.models.builder import ModelConfig, build_model
from mmgpt.media import row_layout
from mmgpt.models.pretrained import WeightsError, load_lora, load_openflamingo, load_state_file
from mmgpt.models.flamingo import MediaContext
from model_helpers import open_gates, randomize_lora_b
from mmgpt.tokenizer import TINY_TOKENIZER_DIR
from mmengine_standins import RELEASED_TUNING, fake_mmengine, lora_config

LAYERS = 4
XATTN_LAYERS = (1, 3)  # tiny: n = 2


def make(seed: int, lora: str = "default", **kw):
    model, _ = build_model(ModelConfig(preset="tiny", lora=lora, seed=seed, **kw))
    return model


def source_model():
    model = make(1)
    open_gates(model, 0.3)
    randomize_lora_b(model, seed=1)
    return model


def plain(model) -> dict[str, torch.Tensor]:
    """Our state dict with peft's naming removed (the OpenFlamingo names)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace("lang_encoder.base_model.model.", "lang_encoder.").replace(".base_layer.", ".")] = v.clone()
    return out


def openflamingo_v1(model) -> dict[str, torch.Tensor]:
    """OpenFlamingo-9B checkpoint.pt layout: trainable params + buffers, with the xattn alias."""
    state = plain(model)
    out = {k: v for k, v in state.items() if k.startswith("perceiver.")}
    out["lang_encoder.model.embed_tokens.weight"] = state["lang_encoder.model.embed_tokens.weight"]
    for k, v in state.items():
        m = re.match(r"lang_encoder\.model\.layers\.(\d+)\.gated_cross_attn_layer\.(.*)", k)
        if m:
            out[k] = v
            out[f"lang_encoder.gated_cross_attn_layers.{m[1]}.{m[2]}"] = v
    for i in range(LAYERS):
        out[f"lang_encoder.model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return out


def mmgpt_lora(model, with_default: bool) -> dict[str, torch.Tensor]:
    """Released mmgpt-lora-v0-release.pt layout (optionally with peft's `.default` segment)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            out[k if with_default else k.replace(".default.", ".")] = v.clone()
    out["lang_encoder.base_model.model.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return out


def same(a, b, names) -> None:
    sa, sb = plain(a), plain(b)
    for n in names:
        assert torch.equal(sa[n], sb[n]), n


def openflamingo_names(model) -> list[str]:
    return [k for k in plain(model) if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k]


def test_v1_layout_round_trip_with_aliases_and_buffers(tmp_path):
    src = source_model()
    path = tmp_path / "checkpoint.pt"
    torch.save(openflamingo_v1(src), path)
    dst = make(2, openflamingo_checkpoint=str(path))
    names = openflamingo_names(src) + ["lang_encoder.model.embed_tokens.weight"]
    assert len(names) > 20
    same(src, dst, names)
    report = load_openflamingo(dst, path)
    assert any("gated_cross_attn_layers" in k for k in report.harmless)
    assert any("inv_freq" in k for k in report.harmless)


def test_v1_wrapped_and_module_prefixed_before_lora(tmp_path):
    src = source_model()
    path = tmp_path / "wrapped.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in openflamingo_v1(src).items()}, "epoch": 3}, path)
    dst = make(2, lora="none", openflamingo_checkpoint=str(path))
    same(src, dst, openflamingo_names(src))


def test_alias_only_checkpoint_loads(tmp_path):
    src = source_model()
    state = {k: v for k, v in openflamingo_v1(src).items() if not k.startswith("lang_encoder.model.layers.")}
    path = tmp_path / "alias.pt"
    torch.save(state, path)
    dst = make(2, openflamingo_checkpoint=str(path))
    same(src, dst, openflamingo_names(src))


def test_v2_flat_full_dict_safetensors(tmp_path):
    src = source_model()
    state = {k.replace("vision_encoder.visual.", "vision_encoder."): v for k, v in plain(src).items()}
    for i in range(LAYERS):
        for k, v in list(state.items()):
            if k.startswith(f"lang_encoder.model.layers.{i}.decoder_layer."):
                state[k.replace(f"lang_encoder.model.layers.{i}.decoder_layer.",
                                f"lang_encoder.old_decoder_blocks.{i}.")] = v.clone()
    path = tmp_path / "v2.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    dst = make(2)
    load_openflamingo(dst, path)
    same(src, dst, list(plain(src)))  # every frozen weight, vision and LLaMA included


def test_missing_cross_attention_weight_fails_naming_it(tmp_path):
    src = source_model()
    state = openflamingo_v1(src)
    gone = "gated_cross_attn_layer.attn.to_kv.weight"
    # drop it under both its primary name and the v1 alias `gated_cross_attn_layers.3.attn.to_kv`
    state = {k: v for k, v in state.items() if not re.search(r"\.3\.(gated_cross_attn_layer\.)?attn\.to_kv\.", k)}
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=re.escape(f"layers.3.{gone}")):
        make(2, openflamingo_checkpoint=str(path))


def test_unknown_key_and_shape_mismatch_fail(tmp_path):
    src = source_model()
    state = openflamingo_v1(src)
    state["perceiver.bogus.weight"] = torch.zeros(2)
    state["perceiver.latents"] = torch.zeros(5, 64)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_openflamingo(make(2), path)
    assert "perceiver.bogus.weight" in str(err.value) and "perceiver.latents" in str(err.value)


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "obj": re.compile("x")}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_openflamingo(make(2), path)


@pytest.mark.parametrize("with_default", [False, True])
def test_released_lora_layout_round_trip(tmp_path, with_default):
    src = source_model()
    path = tmp_path / "mmgpt-lora-v0-release.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in mmgpt_lora(src, with_default).items()}}, path)
    of_path = tmp_path / "of.pt"
    torch.save(openflamingo_v1(src), of_path)
    dst = make(2, openflamingo_checkpoint=str(of_path), lora_checkpoint=str(path))
    ours, theirs = src.state_dict(), dst.state_dict()
    lora_keys = [k for k in ours if ".lora_" in k]
    assert len(lora_keys) == 2 * (4 * LAYERS + 5 * len(XATTN_LAYERS))
    assert all(torch.equal(ours[k], theirs[k]) for k in lora_keys)
    # with the frozen LLaMA/ViT of the source seed, the loaded model reproduces the source outputs
    reloaded = make(1, openflamingo_checkpoint=str(of_path), lora_checkpoint=str(path))
    ids = torch.tensor([[1, 1001, 11, 12, 13]])
    imgs = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outs = [m.lm_forward(ids, MediaContext(m.encode_images(imgs), row_layout(ids, 1001, "previous"))).logits
                for m in (src, reloaded)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_lora_missing_one_matrix_fails(tmp_path):
    src = source_model()
    state = mmgpt_lora(src, with_default=False)
    victim = "lang_encoder.base_model.model.model.layers.3.gated_cross_attn_layer.ff.3.lora_B.weight"
    del state[victim]
    path = tmp_path / "lora.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=re.escape("layers.3.gated_cross_attn_layer.ff.3.lora_B")):
        load_lora(make(2), path)


def test_clip_weights_from_open_clip_state_dict(tmp_path):
    """A genuine open_clip CLIP (QuickGELU, like OpenAI's) saved to disk drives our ViT exactly."""
    torch.manual_seed(5)
    clip = open_clip.model.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, path)
    model = make(2, clip_weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    v = clip.visual
    with torch.no_grad():
        cls = v.class_embedding.expand(2, 1, -1)
        emb = torch.cat([cls, v.conv1(x).flatten(2).transpose(1, 2)], 1) + v.positional_embedding
        expected = v.transformer(v.ln_pre(emb))[:, 1:]  # pre-ln_post patch tokens
        torch.testing.assert_close(model.vision_encoder(x), expected, atol=1e-6, rtol=0)


def test_llama_directory_is_loaded_and_resized(tmp_path):
    """`llama_path`: HF LLaMA weights + sentencepiece tokenizer; embeddings grow by the 3 special tokens."""
    torch.manual_seed(7)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                                         num_attention_heads=4, vocab_size=1000, tie_word_embeddings=False))
    llama.save_pretrained(tmp_path)
    for f in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    model, tok = build_model(ModelConfig(preset="tiny", llama_path=str(tmp_path), lora="none"))
    assert len(tok) == 1003 and model.language_model.get_input_embeddings().weight.shape[0] == 1003
    ours = model.language_model.state_dict()
    for k, v in llama.state_dict().items():
        name = re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1.decoder_layer.", k)
        if "embed_tokens" in k or "lm_head" in k:
            assert torch.equal(ours[name][:1000], v), k
        else:
            assert torch.equal(ours[name], v), k


def training_script_file(src, tuning: dict | None = None) -> dict:
    """checkpoint_{epoch}.pt of the original instruction_finetune.py: DDP keys with peft's `.default`."""
    params = [p for n, p in src.named_parameters() if ".lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"epoch": 0,
            "model_state_dict": {"module." + k: v for k, v in mmgpt_lora(src, with_default=True).items()},
            "optimizer_state_dict": optimizer.state_dict(),
            "lr_scheduler_state_dict": scheduler.state_dict(),
            "tuning_config": lora_config(tuning)}


def released_file(src, tuning: dict | None = None) -> dict:
    """mmgpt-lora-v0-release.pt as app.py reads it: weights + the tuning section (a ConfigDict)."""
    return {"model_state_dict": {"module." + k: v for k, v in mmgpt_lora(src, with_default=False).items()},
            "tuning_config": lora_config(tuning).tuning_config}


def save_with_mmengine(obj_fn, src, path, style: str, tuning: dict | None = None) -> None:
    with fake_mmengine(style):
        torch.save(obj_fn(src, tuning), path)
    assert "mmengine" not in sys.modules  # the loader must do without it


@pytest.mark.parametrize("style", ["legacy", "modern"])
@pytest.mark.parametrize("layout", [training_script_file, released_file], ids=["training", "released"])
def test_mmgpt_file_with_mmengine_tuning_config_loads(tmp_path, layout, style):
    src = source_model()
    path = tmp_path / "mmgpt-lora-v0-release.pt"
    save_with_mmengine(layout, src, path, style)
    with pytest.raises(pickle.UnpicklingError, match="mmengine.config.config"):
        torch.load(path, weights_only=True)  # what load_state_file used to do
    dst = make(2, lora_checkpoint=str(path))
    ours, theirs = src.state_dict(), dst.state_dict()
    lora_keys = [k for k in ours if ".lora_" in k]
    assert lora_keys and all(torch.equal(ours[k], theirs[k]) for k in lora_keys)
    report = load_lora(make(2), path)
    assert sorted(report.loaded) == sorted(lora_keys)
    assert report.settings == {k: RELEASED_TUNING[k] for k in
                               ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}
    assert "lora_r" in str(report) and not any("optimizer" in k or "epoch" in k for k in report.harmless)


@pytest.mark.parametrize("change, field", [
    (dict(lora_r=8), "lora_r"),
    (dict(lora_alpha=32), "lora_alpha"),
    (dict(lora_dropout=0.05), "lora_dropout"),
    (dict(lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out", "ff.3"]),
     "lora_target_modules"),
])
@pytest.mark.parametrize("style", ["legacy", "modern"])
def test_disagreeing_tuning_config_is_refused(tmp_path, change, field, style):
    src = source_model()
    path = tmp_path / "other.pt"
    save_with_mmengine(training_script_file, src, path, style, {**RELEASED_TUNING, **change})
    dst = make(2)
    before = {k: v.clone() for k, v in dst.state_dict().items() if ".lora_" in k}
    with pytest.raises(WeightsError, match=rf"tuning_config disagrees with the model: {field}="):
        load_lora(dst, path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items() if ".lora_" in k)


def test_released_file_refused_by_paper_preset(tmp_path):
    """The released file adapts no LLaMA MLP: a `paper` model (gate/up/down_proj too) must not take it."""
    path = tmp_path / "released.pt"
    save_with_mmengine(released_file, source_model(), path, "legacy")
    with pytest.raises(WeightsError, match=r"lora_target_modules=.*'down_proj', 'ff.1'"):
        load_lora(make(2, lora="paper"), path)


class Evil:
    """Pickles as a call of `fn(*args)`: what a booby-trapped checkpoint would run on load."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("where", ["top", "in_config"])
@pytest.mark.parametrize("fn, name", [(os.system, f"{os.system.__module__}.system"),
                                      (builtins.eval, "builtins.eval"),
                                      (subprocess.Popen, "subprocess.Popen")])
def test_malicious_pickle_is_refused_without_running(tmp_path, fn, name, where):
    marker = tmp_path / "pwned"
    args = {os.system: (f"touch {marker}",), builtins.eval: (f"open({str(marker)!r}, 'w').close()",),
            subprocess.Popen: (["touch", str(marker)],)}[fn]
    src = source_model()
    path = tmp_path / "mmgpt-lora-v0-release.pt"
    tuning = {**RELEASED_TUNING, "vis": Evil(fn, *args)} if where == "in_config" else None
    with fake_mmengine("legacy"):
        state = released_file(src, tuning)
        if where == "top":
            state["payload"] = Evil(fn, *args)
        torch.save(state, path)
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(path))}: refused to unpickle global "
                                              rf"{re.escape(name)} .*nothing was executed$"):
        load_lora(make(2), path)
    assert not marker.exists()


def test_build_onto_an_allowed_function_is_refused(tmp_path):
    """BUILD with slot state onto an allowed torch function would set its defaults for every later load."""
    path = tmp_path / "tamper.pt"
    torch.save({}, path)
    tamper = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0e\x00\x00\x00__kwdefaults__}s\x86b.")
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(tmp_path / "t.pt", "w") as new:
        for info in old.infolist():
            new.writestr(info, tamper if info.filename.endswith("/data.pkl") else old.read(info))
    with pytest.raises(WeightsError, match=r"BUILD on function is not allowed"):
        load_state_file(tmp_path / "t.pt")
    assert torch._utils._rebuild_tensor_v2.__kwdefaults__ is None
