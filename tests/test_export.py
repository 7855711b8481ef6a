"""`mmgpt export`: merged == adapter, the LLaMA dir opens with plain transformers, the adapter with
plain peft, the OpenFlamingo checkpoint layout, manifest hashes, and refusal of a bad merge.

The source run starts from an OpenFlamingo-layout checkpoint with open gates (as the real
OpenFlamingo-9B has), so cross-attention and its LoRA change the logits.
Tolerances (float32): logits agree to 1e-4 x max(1, max |logit|) after a merge (the export's own
criterion); loading the same weights through another route agrees to 1e-5.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from mmgpt import export as export_mod
from mmgpt.cli import main
from mmgpt.train.config import TrainConfig
from mmgpt.export import MergeCheckError, export, merge_checked, openflamingo_state, write_language_model
from mmgpt.inference.model_dir import load_model, resolve_source
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.media import row_layout
from mmgpt.models.flamingo import MediaContext
from model_helpers import open_gates, randomize_lora_b

SIZE = preset_image_size("tiny")
TEXT = "<s>### Image:\n<image>\n\n### Instruction:\nWhat colour is the bus?\n\n### Response:\nThe bus is red.</s>"


def make_base(root: Path) -> ModelConfig:
    """A "pretrained" tiny base as users have it: an HF LLaMA directory plus an OpenFlamingo-layout
    checkpoint with open gates (like OF-9B). The final norm is scaled up so that logits can be as
    confident as a trained LM's (random-init logits are bounded near uniform: nothing could be
    memorised through LoRA alone)."""
    built = build_model(ModelConfig(preset="tiny", lora="none", seed=0))
    base, tok = built.model, built.tokenizer
    open_gates(base, 0.8)
    with torch.no_grad():
        base.language_model.model.norm.weight.mul_(25.0)
    write_language_model(base.language_model, tok, root / "llama", torch.float32)
    save_file(openflamingo_state(base), str(root / "openflamingo_base.safetensors"))
    return ModelConfig(preset="tiny", seed=0, llama_path=str(root / "llama"),
                       openflamingo_checkpoint=str(root / "openflamingo_base.safetensors"))


def save_run(run: Path, cfg: ModelConfig, model) -> Path:
    """An OUT-like training dir: the resolved config.yaml and the peft adapter/."""
    TrainConfig(mixture=str(run / "mixture.yaml"), output_dir=str(run), model=cfg).save(_mkdir(run) / "config.yaml")
    model.lang_encoder.save_pretrained(str(run / "adapter"))
    return run


def make_run(root: Path) -> tuple[Path, ModelConfig]:
    """A run whose LoRA is random (nonzero), on the open-gate base."""
    cfg = make_base(root)
    model = build_model(cfg).model
    randomize_lora_b(model, std=0.2)
    return save_run(root / "run", cfg, model), cfg


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, cfg = make_run(root)
    out = export(run, root / "out", merge=True, dtype_name="fp32")
    built = load_model(resolve_source(run))
    trained, tok = built.model, built.tokenizer
    return run, out, trained, tok


def inputs(model, tok, seed: int = 5):
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    media = MediaContext(model.encode_images(image), row_layout(ids, model.image_token_id, "previous"))
    return ids, media


@torch.no_grad()
def logits(model, ids, media):
    return model.lm_forward(ids, media).logits.float()


def assert_merged_close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-4 * max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol


def test_merged_export_equals_adapter_model(exported):
    run, out, trained, tok = exported
    built = load_model(resolve_source(out))
    merged, mtok = built.model, built.tokenizer
    assert not hasattr(merged.lang_encoder, "peft_config"), "merged model must carry no LoRA"
    ids, media = inputs(trained, tok)
    ref = logits(trained, ids, media)
    assert_merged_close(logits(merged, ids, media), ref)
    # the image matters here, so the cross-attention merge is what is being compared
    ids2, media2 = inputs(trained, tok, seed=6)
    assert float((logits(trained, ids2, media2) - ref).abs().max()) > 1e-3
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["merge_check"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["images"] == 1
    assert mtok("a red bus")["input_ids"] == tok("a red bus")["input_ids"]


def test_language_model_dir_opens_with_plain_transformers(exported):
    run, out, trained, tok = exported
    lm_dir = out / "language_model"
    llama = LlamaForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32).eval()
    plain_tok = AutoTokenizer.from_pretrained(str(lm_dir))
    assert len(plain_tok) == len(tok) == llama.config.vocab_size
    for token in ("<|endofchunk|>", "<image>", "<PAD>"):
        assert plain_tok.convert_tokens_to_ids(token) == tok.convert_tokens_to_ids(token)
    ids = torch.tensor([plain_tok(TEXT, add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [tok(TEXT, add_special_tokens=False)["input_ids"]]
    keys = load_file(str(lm_dir / "model.safetensors")).keys()
    assert not any("decoder_layer" in k or "gated_cross_attn" in k or "lora" in k for k in keys)
    # the LLaMA path of our adapter model: media=None skips the cross-attention blocks
    with torch.no_grad():
        plain = llama(input_ids=ids).logits.float()
        ours = trained.lm_forward(ids, None).logits.float()
    assert_merged_close(plain, ours)


def test_adapter_opens_with_plain_peft(exported):
    run, out, trained, tok = exported
    cfg = TrainConfig.load(run / "config.yaml").model
    base = build_model(ModelConfig(**{**cfg.__dict__, "lora": "none"})).model
    base.lang_encoder = PeftModel.from_pretrained(base.lang_encoder, str(out / "adapter"))
    base.eval()
    ids, media = inputs(trained, tok)
    torch.testing.assert_close(logits(base, ids, media), logits(trained, ids, media), atol=1e-5, rtol=0)
    # without the adapter the model differs: the LoRA really is in adapter/
    bare = build_model(ModelConfig(**{**cfg.__dict__, "lora": "none"})).model
    assert float((logits(bare.eval(), ids, media) - logits(trained, ids, media)).abs().max()) > 1e-3


def test_openflamingo_checkpoint_layout(exported):
    run, out, trained, tok = exported
    st = load_file(str(out / "openflamingo" / "checkpoint.safetensors"))
    pt = torch.load(out / "openflamingo" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert st.keys() == pt.keys()
    for k in st:
        assert torch.equal(st[k], pt[k])
    assert "lang_encoder.model.embed_tokens.weight" in st
    assert any(k.startswith("perceiver.") for k in st)
    xattn = {k.split(".")[3] for k in st if ".gated_cross_attn_layer." in k}
    layers = trained.language_model.model.layers
    assert xattn == {str(i) for i, layer in enumerate(layers) if layer.gated_cross_attn_layer is not None}
    assert all(k.startswith(("perceiver.", "lang_encoder.model.layers.", "lang_encoder.model.embed_tokens"))
               for k in st)
    assert not any("lora" in k or "decoder_layer" in k for k in st)
    gate = next(k for k in st if k.endswith("attn_gate"))
    assert float(st[gate].abs().max()) > 0


def test_manifest_hashes_and_config(exported):
    run, out, trained, tok = exported
    manifest = json.loads((out / "manifest.json").read_text())
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for rel, info in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == info["sha256"]
        assert info["bytes"] == (out / rel).stat().st_size  # the export's size field, as every export wrote it
    assert {"torch", "transformers", "peft", "mmgpt"} <= set(manifest["versions"])
    assert manifest["lora"]["r"] == 16 and manifest["source"]["kind"] == "train"
    config = json.loads((out / "mmgpt_config.json").read_text())
    assert config["merged"] is True and config["model"]["preset"] == "tiny" and config["image_size"] == SIZE


def test_adapter_only_export_and_bf16_merge(tmp_path):
    run, _ = make_run(tmp_path)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "adapter", "manifest.json", "mmgpt_config.json"]
    source = resolve_source(tmp_path / "a")
    assert source.kind == "export-adapter"
    assert main(["export", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                 "--merge", "--dtype", "bf16"]) == 0
    weights = load_file(str(tmp_path / "b" / "language_model" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert {v.dtype for v in load_file(str(tmp_path / "b" / "openflamingo" / "checkpoint.safetensors")).values()} \
        == {torch.bfloat16}


class _MergeThatDropsLoRA(nn.Module):
    """A broken merge for the test: unloads the LoRA instead of folding it in."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def get_base_model(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def merge_and_unload(self) -> nn.Module:
        return self.peft_model.unload()


def test_merge_check_detects_a_wrong_merge(tmp_path):
    run, _ = make_run(tmp_path)
    built = load_model(resolve_source(run))
    built.model.lang_encoder = _MergeThatDropsLoRA(built.model.lang_encoder)
    with pytest.raises(MergeCheckError, match="refusing"):
        merge_checked(built)


def test_refused_merge_writes_nothing(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path)
    monkeypatch.setattr(export_mod, "MERGE_TOLERANCE", -1.0)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out"), "--merge"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "openflamingo_base.safetensors", "run"]


def test_checkpoint_dirs_resolve(tmp_path, capsys):
    run, _ = make_run(tmp_path)
    assert resolve_source(run).adapter_dir == run / "adapter"
    # with checkpoints, the one `latest` names wins (a resumed run may be past OUT/adapter)
    tag = run / "checkpoints" / "step_00000010"
    shutil.copytree(run / "adapter", _mkdir(tag) / "adapter")
    _mkdir(run / "checkpoints" / "step_00000005")
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    assert resolve_source(run).adapter_dir == tag / "adapter"
    assert resolve_source(tag).kind == "checkpoint"
    assert resolve_source(tag / "adapter").kind == "adapter"
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint not found" in capsys.readouterr().err  # before torch is even imported
    _mkdir(tmp_path / "full").joinpath("x").write_text("x")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_runs_model_section_is_read_as_train_config_reads_it(exported, tmp_path):
    """Inference reads a run's config.yaml without TrainConfig (`run_layout.run_model_section`):
    the same ModelConfig as `TrainConfig.load`, a relative path (only a hand edit leaves one)
    resolved against the run's folder, and a run written before `media_attention` loads as previous."""
    run = shutil.copytree(exported[0], tmp_path / "run")
    written = yaml.safe_load((run / "config.yaml").read_text())
    written["model"]["llama_path"] = "../llama"
    del written["model"]["media_attention"]
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    got = resolve_source(run).model_config
    assert got.llama_path == str((tmp_path / "llama").resolve()) and got.media_attention == "previous"
    with_mode = {**written["model"], "media_attention": "previous"}
    (run / "config.yaml").write_text(yaml.safe_dump({**written, "model": with_mode}))
    assert got == TrainConfig.load(run / "config.yaml").model


def test_media_attention_is_recorded_and_legacy_configs_load_as_previous(tmp_path):
    """Chat must decode with the mode training used: exports carry it; files written before the
    field existed were trained with "previous" semantics and load so."""
    from mmgpt.export import export_config
    from mmgpt.inference.model_dir import ModelSource, model_config_from_dict

    source = ModelSource(tmp_path, "train", ModelConfig(preset="tiny", media_attention="random"), None)
    written = export_config(source, SIZE, merged=False, dtype_name="fp32")["model"]
    assert written["media_attention"] == "random"
    assert model_config_from_dict(written, tmp_path).media_attention == "random"
    legacy = {k: v for k, v in written.items() if k != "media_attention"}
    assert model_config_from_dict(legacy, tmp_path).media_attention == "previous"
    assert ModelConfig().media_attention == "next"  # new runs default to the released model's rule


def test_export_is_hub_ready_model_card_chat_template_base_model(tmp_path):
    """README.md with hub metadata and the run's training summary; the tokenizer's chat_template
    renders a 2-round image conversation to exactly the training token ids."""
    from torch.utils.tensorboard import SummaryWriter

    from mmgpt.data.conversation import Conversation, Round, tokenize

    run, cfg = make_run(tmp_path)
    (run / "data_report.json").write_text(json.dumps({"sources": {
        "llava": {"read": 9, "selected": 8, "kept": 7, "dropped": {}, "errors": []}}}))
    with SummaryWriter(str(run / "tensorboard")) as writer:
        for step, loss in ((1, 2.5), (2, 1.25)):
            writer.add_scalar("train/loss", loss, step)
    out = export(run, tmp_path / "out", merge=True, dtype_name="fp32")
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == cfg.llama_path
    assert meta["mmgpt"]["media_attention"] == cfg.media_attention and meta["mmgpt"]["lora"]["r"] == 16
    assert meta["mmgpt"]["training"] == {"data": {"llava": 7}, "steps": 2, "final_loss": {"loss": 1.25}}
    assert "gated_cross_attn_layer" in card and "load_model(resolve_source" in card
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == cfg.llama_path
    conv = Conversation([Round("What color is the sofa?", "The sofa is red."),
                         Round("Is the cat asleep?", "No, it is awake.")], images=["x.jpg"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the sofa?"}]},
                {"role": "assistant", "content": "The sofa is red."},
                {"role": "user", "content": "Is the cat asleep?"}, {"role": "assistant", "content": "No, it is awake."}]
    for where in ("adapter", "language_model"):
        tok = AutoTokenizer.from_pretrained(str(out / where))
        text = tok.apply_chat_template(messages, tokenize=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == tokenize(conv, tok, 4096).input_ids, where


# ---------------------------------------------------------------- issue 22: where an export goes, what loads


def _as_nobody(fn, *args) -> str:
    """`fn(*args)` in a forked child running as uid 65534 (root ignores permission bits): the
    exception it raised, as 'Type: message', or 'ok'."""
    import multiprocessing
    import os

    def child(queue):
        os.setuid(65534)
        try:
            fn(*args)
            queue.put("ok")
        except Exception as err:  # noqa: BLE001 - reported to the parent
            queue.put(f"{type(err).__name__}: {err}")

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(60)
    return queue.get(timeout=5)


def test_an_unusable_out_is_refused_before_anything_is_read(tmp_path):
    """A read-only directory (OSError traceback after the whole model load before) and a mount
    point (EBUSY after the export was built): one line, and no checkpoint is even resolved (the
    checkpoint named here does not exist, so a later check would have said that instead)."""
    import os
    import tempfile

    missing = tmp_path / "no-such-run"
    readonly = Path(tempfile.mkdtemp(prefix="mmgpt-ro-"))  # under /tmp: reachable by uid 65534
    try:
        readonly.chmod(0o555)
        if os.geteuid() == 0:
            got = _as_nobody(export, missing, readonly / "out")
        else:
            try:
                export(missing, readonly / "out")
                got = "ok"
            except Exception as err:  # noqa: BLE001
                got = f"{type(err).__name__}: {err}"
        assert got == f"ExportTargetError: --out {readonly / 'out'}: cannot write in {readonly}: Permission denied"
        assert list(readonly.iterdir()) == []
    finally:
        readonly.chmod(0o755)
        shutil.rmtree(readonly)
    mount = next(p for p in (Path("/dev/shm"), Path("/proc"), Path("/")) if p.is_mount())
    with pytest.raises(export_mod.ExportTargetError, match=f"--out {mount} is a mount point"):
        export(missing, mount)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "full")]) == 2


def test_a_users_partial_directory_is_never_touched(tmp_path):
    """The old staging name OUT.partial was deleted without a word; staging is now private."""
    run, _ = make_run(tmp_path)
    mine = tmp_path / "out.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files")
    out = export(run, tmp_path / "out")
    assert (mine / "notes.txt").read_text() == "my own files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "openflamingo_base.safetensors", "out",
                                                          "out.partial", "run"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_commands_verify_the_export_manifest(exported, tmp_path, capsys):
    """chat, serve, eval and export check an export against its manifest.json before loading:
    sizes always (a truncated safetensors was a SafetensorError traceback), sha256 with --verify
    (altered bytes loaded silently); each refusal is one line naming the file, and the check made
    is said on stderr."""
    _, out, _, _ = exported
    good = shutil.copytree(out, tmp_path / "good")
    truncated = shutil.copytree(out, tmp_path / "truncated")
    weights = truncated / "openflamingo" / "checkpoint.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    altered = shutil.copytree(out, tmp_path / "altered")
    lm = next((altered / "language_model").glob("*.safetensors"))
    data = bytearray(lm.read_bytes())
    data[-10] ^= 0xFF
    lm.write_bytes(bytes(data))
    chat = ["chat", "--prompt", "hi", "--max-new-tokens", "1", "--model"]
    evaluate = ["eval", "--task", "vqa", "--images", str(tmp_path), "--model"]
    for argv in (chat, ["serve", "--model"], evaluate, ["export", "--out", str(tmp_path / "o"), "--checkpoint"]):
        assert main([*argv, str(truncated)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{weights}: " in err[0] and "manifest.json says" in err[0], (argv, err)
        assert main([*argv, str(altered), "--verify"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{lm}: sha256 differs from manifest.json" in err[0], (argv, err)
    assert main([*chat, str(altered)]) == 0  # sizes only: said so
    assert "sizes (--verify also checks sha256)" in capsys.readouterr().err
    with open(good / "README.md", "a") as card:  # what `mmgpt eval --update-card` does: not a damage
        card.write("\nmetrics\n")
    assert main([*chat, str(good), "--verify"]) == 0
    assert "files match manifest.json: sizes and sha256" in capsys.readouterr().err


def test_built_and_loaded_models_carry_the_configs_settings(tmp_path):
    """`build_model`, a training run and a merged export (its own LLaMA dir and tokenizer) each hand
    out the config's settings with the model. The config asks for a non-default media attention,
    so a loader that dropped it (or took the image size, transform or tokenizer from elsewhere)
    fails here."""
    from dataclasses import replace

    from PIL import Image

    from mmgpt.image_transform import clip_transform

    cfg = replace(make_base(tmp_path), media_attention="previous")
    built = build_model(cfg)
    randomize_lora_b(built.model, std=0.2)
    run = save_run(tmp_path / "run", cfg, built.model)
    merged = export(run, tmp_path / "merged", merge=True, dtype_name="fp32")
    picture = Image.new("RGB", (48, 40), (200, 40, 40))
    text = "What colour is the bus? <image>"
    for where, loaded in [("build_model", built), ("run", load_model(resolve_source(run))),
                          ("merged export", load_model(resolve_source(merged)))]:
        assert loaded.media_attention == "previous", where
        assert loaded.image_size == SIZE == loaded.model.vision_encoder.spec.image_size, where
        pixels = loaded.transform(picture)
        assert pixels.shape == (3, SIZE, SIZE) and torch.equal(pixels, clip_transform(SIZE)(picture)), where
        assert loaded.tokenizer(text)["input_ids"] == built.tokenizer(text)["input_ids"], where
        assert loaded.image_token_id == loaded.tokenizer.convert_tokens_to_ids("<image>"), where
