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
from collections import OrderedDict
from dataclasses import replace

import open_clip.model
import pytest
import torch
from torch import nn
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
    model = build_model(ModelConfig(preset="tiny", lora=lora, seed=seed, **kw)).model
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


def get_checkpoint(module: nn.Module) -> OrderedDict:
    """OpenFlamingo's / MultiModal-GPT's `get_checkpoint`: the module's own `state_dict()` (an OrderedDict
    carrying `_metadata`) with every frozen parameter deleted, buffers kept."""
    state = module.state_dict()
    for name, param in module.named_parameters():
        if not param.requires_grad:
            del state[name]
    return state


class DDPNames(nn.Module):
    """The tree `DistributedDataParallel` puts around a model: the same state dict under `module.`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


class OpenFlamingoV1Tree(nn.Module):
    """OpenFlamingo v1's module tree over a LoRA-free source: `perceiver`, `vision_encoder`, and the
    LLaMA as `lang_encoder`, whose `gated_cross_attn_layers` list shares the layers' blocks (so its
    state dict names each block twice, as OF-9B's checkpoint.pt does)."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.vision_encoder = src.vision_encoder.visual
        self.perceiver = src.perceiver
        self.lang_encoder = src.language_model
        self.lang_encoder.gated_cross_attn_layers = nn.ModuleList(
            [layer.gated_cross_attn_layer or nn.Identity() for layer in self.lang_encoder.model.layers])

    def train_like_openflamingo(self) -> None:
        """OF v1 trains the perceiver, the cross-attention blocks and the input embeddings."""
        self.requires_grad_(False)
        for module in (self.perceiver, self.lang_encoder.gated_cross_attn_layers,
                       self.lang_encoder.get_input_embeddings()):
            module.requires_grad_(True)


def openflamingo_v1(seed: int = 1, ddp: bool = False) -> tuple[nn.Module, OrderedDict]:
    """(source model without LoRA, its OpenFlamingo-9B `checkpoint.pt` state) written the original's way;
    `ddp`: as the training script's checkpoints name it (under `module.`). The frozen weights equal
    `source_model()`'s (same seed; LoRA is added after construction) and so do the gates."""
    src = make(seed, lora="none")
    open_gates(src, 0.3)
    tree = OpenFlamingoV1Tree(src)
    tree.train_like_openflamingo()
    state = get_checkpoint(DDPNames(tree) if ddp else tree)
    del tree.lang_encoder.gated_cross_attn_layers
    return src, state


def mmgpt_lora(model, with_default: bool) -> OrderedDict:
    """The MultiModal-GPT LoRA state: `get_checkpoint(ddp_model)` of a model whose only trainable
    tensors are the LoRA matrices. Without `.default`: peft 0.2's names (its LoRA layers held
    `lora_A`/`lora_B` directly), the same OrderedDict re-keyed with its `_metadata` kept."""
    state = get_checkpoint(DDPNames(model))
    if with_default:
        return state
    renamed = OrderedDict((k.replace(".default.", "."), v) for k, v in state.items())
    renamed._metadata = state._metadata
    return renamed


def same(a, b, names) -> None:
    sa, sb = plain(a), plain(b)
    for n in names:
        assert torch.equal(sa[n], sb[n]), n


def openflamingo_names(model) -> list[str]:
    return [k for k in plain(model) if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k]


def test_v1_layout_round_trip_with_aliases(tmp_path):
    src, state = openflamingo_v1()
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    dst = make(2, openflamingo_checkpoint=str(path))
    names = openflamingo_names(src) + ["lang_encoder.model.embed_tokens.weight"]
    assert len(names) > 20
    same(src, dst, names)
    report = load_openflamingo(dst, path)
    assert any("gated_cross_attn_layers" in k for k in report.harmless)


def test_v1_wrapped_and_module_prefixed_before_lora(tmp_path):
    src, state = openflamingo_v1(ddp=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"model_state_dict": state, "epoch": 3}, path)
    dst = make(2, lora="none", openflamingo_checkpoint=str(path))
    same(src, dst, openflamingo_names(src))


def test_alias_only_checkpoint_loads(tmp_path):
    src, state = openflamingo_v1()
    for key in [k for k in state if k.startswith("lang_encoder.model.layers.")]:
        del state[key]
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
    _, state = openflamingo_v1()
    gone = "gated_cross_attn_layer.attn.to_kv.weight"
    # drop it under both its primary name and the v1 alias `gated_cross_attn_layers.3.attn.to_kv`
    for key in [k for k in state if re.search(r"\.3\.(gated_cross_attn_layer\.)?attn\.to_kv\.", k)]:
        del state[key]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=re.escape(f"layers.3.{gone}")):
        make(2, openflamingo_checkpoint=str(path))


def test_unknown_key_and_shape_mismatch_fail(tmp_path):
    _, state = openflamingo_v1()
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
    torch.save({"model_state_dict": mmgpt_lora(src, with_default)}, path)
    of_path = tmp_path / "of.pt"
    torch.save(openflamingo_v1()[1], of_path)
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
    victim = "module.lang_encoder.base_model.model.model.layers.3.gated_cross_attn_layer.ff.3.lora_B.weight"
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
    built = build_model(ModelConfig(preset="tiny", llama_path=str(tmp_path), lora="none"))
    model, tok = built.model, built.tokenizer
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
            "model_state_dict": mmgpt_lora(src, with_default=True),
            "optimizer_state_dict": optimizer.state_dict(),
            "lr_scheduler_state_dict": scheduler.state_dict(),
            "tuning_config": lora_config(tuning)}


def released_file(src, tuning: dict | None = None) -> dict:
    """mmgpt-lora-v0-release.pt as app.py reads it: weights + the tuning section (a ConfigDict)."""
    return {"model_state_dict": mmgpt_lora(src, with_default=False),
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


@pytest.mark.parametrize("layout", [training_script_file, released_file], ids=["training", "released"])
def test_state_dict_metadata_is_pickled_and_admitted(tmp_path, layout):
    """`nn.Module.state_dict()` pickles its `_metadata` as a BUILD on the OrderedDict: the loader takes it."""
    path = tmp_path / "mmgpt-lora-v0-release.pt"
    save_with_mmengine(layout, source_model(), path, "legacy")
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert b"_metadata" in data and pickle.BUILD in data
    state = load_state_file(path)["model_state_dict"]
    assert type(state) is OrderedDict and state._metadata[""] == {"version": 1}


@pytest.mark.parametrize("attribute, value", [("_metadata", {"": {"version": re.compile("x")}}),
                                              ("_metadata", {"": {"version": [1]}}),
                                              ("extra", 1)])
def test_other_build_on_an_ordered_dict_is_refused(tmp_path, attribute, value):
    """Only `_metadata` of plain data may be set on an OrderedDict (compiled patterns are refused as
    globals; a list or another attribute by the BUILD check)."""
    state = get_checkpoint(DDPNames(source_model()))
    setattr(state, attribute, value)
    path = tmp_path / "tampered.pt"
    with fake_mmengine("modern"):
        torch.save({"model_state_dict": state, "tuning_config": lora_config().tuning_config}, path)
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(path))}: (cannot unpickle: BUILD on OrderedDict "
                                           r"with a state other than|refused to unpickle global re\.)"):
        load_state_file(path)


def test_released_file_written_the_originals_way_drives_chat(tmp_path):
    """`build_model` loads the released layout strictly and chat answers exactly as the source model."""
    from mmgpt.inference.chat import ChatSession
    from mmgpt.inference.generation import GenerationConfig
    from PIL import Image

    src = source_model()
    lora_path, of_path = tmp_path / "mmgpt-lora-v0-release.pt", tmp_path / "checkpoint.pt"
    save_with_mmengine(released_file, src, lora_path, "legacy")
    torch.save(openflamingo_v1()[1], of_path)
    built = build_model(ModelConfig(preset="tiny", seed=1, openflamingo_checkpoint=str(of_path),
                                    lora_checkpoint=str(lora_path)))
    loaded, tok = built.model, built.tokenizer
    bare = build_model(ModelConfig(preset="tiny", seed=1, openflamingo_checkpoint=str(of_path))).model
    image = Image.new("RGB", (40, 40), (200, 40, 40))
    answers = []
    for model in (src, loaded, bare):
        chat = ChatSession(replace(built, model=model.eval()), GenerationConfig(max_new_tokens=8))
        chat.set_image(image)
        answers.append(tok(chat.ask("What is in the image?"), add_special_tokens=False)["input_ids"])
    assert answers[0] and answers[1] == answers[0]
    assert answers[2] != answers[0]  # the LoRA weights change the answer: they were really loaded
