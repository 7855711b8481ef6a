"""`mmgpt export`: ship a trained model as artefacts that open in the tools users already have.

Layout of `--out DIR`:
  adapter/                  peft adapter (adapter_config.json + adapter_model.safetensors). Our LoRA
                            also adapts the gated cross-attention, which a plain LLaMA lacks, so
                            "plain peft" loading means `PeftModel.from_pretrained(lang_encoder, DIR/adapter)`
                            onto our Flamingo-wrapped LLaMA (`build_model(cfg with lora="none")`).
  mmgpt_config.json         the source ModelConfig (+ merged flag, image size, dtype): rebuilds the model.
  README.md                 the model card (hub metadata, training summary, how to load).
  adapter/ and language_model/ also hold the tokenizer with a `chat_template` that renders
  conversations exactly as training tokenised them.
  manifest.json             versions, source, LoRA config, merge check, sha256 of every file.
  with --merge:
  language_model/           HF LLaMA dir: LoRA folded into q/k/v/o (+ MLP), layer keys unwrapped from
                            `layers.{i}.decoder_layer.*` to `layers.{i}.*`, config, safetensors,
                            tokenizer with the three added tokens. Opens with LlamaForCausalLM /
                            AutoTokenizer.from_pretrained; it is the text path (no cross-attention).
  openflamingo/checkpoint.safetensors and checkpoint.pt
                            perceiver + merged gated cross-attention + input embeddings in
                            OpenFlamingo's key layout; the vision tower stays the source's CLIP.

Merging happens in float32 and is checked before anything is written: the merged model's logits on
a probe prompt with an image must match the adapter model's within MERGE_TOLERANCE (relative to the
largest logit); otherwise the export is refused. Files are written into a private temporary
directory beside DIR (`mkdtemp`: never a name a user could own, such as DIR.partial), created before
the model is loaded so an unwritable place fails first, and renamed to DIR at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

import mmgpt
from mmgpt import model_card
from mmgpt.data.conversation import Conversation, Round, tokenize
from mmgpt.data.templates import chat_template
from mmgpt.inference.model_dir import DTYPES, ModelSource, load_model, resolve_source
from mmgpt.manifest import EXPORT_SIZE, write_manifest
from mmgpt.media import row_layout
from mmgpt.models.builder import BuiltModel
from mmgpt.models.flamingo import Flamingo, MediaContext
from mmgpt.run_layout import (ADAPTER_CONFIG, ADAPTER_DIR, EXPORT_CONFIG, LANGUAGE_MODEL_DIR, MODEL_CARD,
                              OPENFLAMINGO_DIR, OPENFLAMINGO_FILE, OPENFLAMINGO_PICKLE)

EXPORT_FORMAT = "mmgpt-export/1"
MERGE_TOLERANCE = 1e-4  # fp32: max |merged - adapter| <= 1e-4 * max(1, max |adapter logit|)
PROBE_SEED = 1234
_LAYER_WRAPPER = re.compile(r"^model\.layers\.(\d+)\.decoder_layer\.")


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce the adapter model: nothing was written."""


class ExportTargetError(ValueError):
    """`--out` cannot receive the export (not writable, a mount point, not empty): found before
    the model is loaded."""


def staging_dir(out: Path) -> Path:
    """A new private directory beside `out` for the files being written (renamed to `out` when
    complete): its creation proves the place writable before anything is loaded. `out` must be
    absent or an empty directory that is no mount point (a rename cannot replace one)."""
    if out.is_mount():
        raise ExportTargetError(f"--out {out} is a mount point: an export is renamed into place, "
                                "choose a new directory inside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportTargetError(f"--out {out} exists and is not empty (or is no directory); choose a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise ExportTargetError(f"--out {out}: cannot write in {out.parent}: {err.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the export's own mode
    return staging


def probe_inputs(built: BuiltModel) -> tuple[Tensor, MediaContext]:
    """A templated question + answer about one seeded random image: ids [1, T] and its media
    (media attention "previous", so that every answer token attends the image and the probe checks
    the merged cross-attention on all of them, whatever the model's own media attention)."""
    conv = Conversation(rounds=[Round("Describe the image in detail.", "A probe answer with a few words.")],
                        images=["probe"])
    ids = torch.tensor([tokenize(conv, built.tokenizer, max_length=1 << 20).input_ids])
    gen = torch.Generator().manual_seed(PROBE_SEED)
    image = torch.randn(1, 3, built.image_size, built.image_size, generator=gen)
    ids, image = ids.to(built.device), image.to(built.device)
    return ids, MediaContext(built.model.encode_images(image), row_layout(ids, built.image_token_id, "previous"))


@torch.no_grad()
def probe_logits(model: Flamingo, ids: Tensor, media: MediaContext) -> Tensor:
    return model.lm_forward(ids, media).logits.float()


def merge_checked(built: BuiltModel) -> dict[str, Any]:
    """Fold LoRA into the weights in place (peft merge_and_unload) and prove the logits unchanged."""
    model = built.model
    ids, media = probe_inputs(built)
    before = probe_logits(model, ids, media)
    model.lang_encoder = model.lang_encoder.merge_and_unload()
    # the latents do not depend on the LoRA (it only adapts the language side), so they are reused
    after = probe_logits(model, ids, media)
    diff = float((after - before).abs().max())
    tolerance = MERGE_TOLERANCE * max(1.0, float(before.abs().max()))
    check = {"max_abs_diff": diff, "tolerance": tolerance, "probe_tokens": int(ids.numel()), "images": 1}
    if not diff <= tolerance:
        raise MergeCheckError(f"merged logits differ from the adapter's by {diff:.3g} > {tolerance:.3g}; "
                              "refusing to export")
    return check


def language_model_state(llama: LlamaForCausalLM) -> dict[str, Tensor]:
    """A plain LLaMA state dict: cross-attention dropped, `decoder_layer.` unwrapped."""
    return {_LAYER_WRAPPER.sub(r"model.layers.\1.", k): v for k, v in llama.state_dict().items()
            if ".gated_cross_attn_layer." not in k}


def write_language_model(llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path,
                         dtype: torch.dtype) -> None:
    """HF LLaMA directory (safetensors shards, config, tokenizer) of the merged language model."""
    config = LlamaConfig.from_dict(llama.config.to_dict())
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)  # no second copy of the weights: assign the merged ones
    plain.load_state_dict(language_model_state(llama), strict=True, assign=True)
    plain.to(dtype).save_pretrained(str(out), max_shard_size="5GB")
    tokenizer.save_pretrained(str(out))


def openflamingo_state(model: Flamingo) -> dict[str, Tensor]:
    """perceiver.*, lang_encoder.model.layers.{i}.gated_cross_attn_layer.*, and the input
    embeddings (rows of the added tokens included): OpenFlamingo v1's checkpoint.pt keys."""
    assert not hasattr(model.lang_encoder, "peft_config"), "merge before extracting"
    keep = ("perceiver.", "lang_encoder.model.embed_tokens.weight")
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith(keep) or ".gated_cross_attn_layer." in k}


def write_openflamingo(model: Flamingo, out: Path, dtype: torch.dtype) -> None:
    out.mkdir(parents=True)
    state = {k: v.to(dtype) for k, v in openflamingo_state(model).items()}
    save_file(state, str(out / OPENFLAMINGO_FILE), metadata={"format": "pt"})
    torch.save(state, out / OPENFLAMINGO_PICKLE)


def versions() -> dict[str, str]:
    import open_clip
    import peft
    import safetensors
    import transformers

    return {"mmgpt": mmgpt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "open_clip": open_clip.__version__, "safetensors": safetensors.__version__,
            "python": sys.version.split()[0]}


def export_config(source: ModelSource, image_size: int, merged: bool, dtype_name: str) -> dict[str, Any]:
    model = asdict(source.model_config)
    model["lora_checkpoint"] = None  # the trained LoRA is adapter/ (or folded in), not the start point
    return {"format": EXPORT_FORMAT, "merged": merged, "dtype": dtype_name,
            "image_size": image_size, "model": model}


def export(checkpoint: str | Path, out: str | Path, merge: bool = False, dtype_name: str = "bf16") -> Path:
    """Write the export directory (see the module docstring); returns its path."""
    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}; choose from {sorted(DTYPES)}")
    out = Path(out).absolute()
    dtype = DTYPES[dtype_name]
    staging = staging_dir(out)  # first: an unwritable --out is refused before anything is read
    try:
        source = resolve_source(checkpoint)
        if source.adapter_dir is None:
            raise ValueError(f"{checkpoint} is already a merged export; export from the training run instead")
        built = load_model(source, dtype=torch.float32)  # fp32: exact merge, exact check
        model, tokenizer = built.model, built.tokenizer
        model.lang_encoder.save_pretrained(str(staging / ADAPTER_DIR))
        adapter_config = staging / ADAPTER_DIR / ADAPTER_CONFIG
        lora = json.loads(adapter_config.read_text())
        lora["base_model_name_or_path"] = source.model_config.llama_path or f"mmgpt:{source.model_config.preset}"
        adapter_config.write_text(json.dumps(lora, indent=2))
        tokenizer.chat_template = chat_template()  # the training rendering, for apply_chat_template
        tokenizer.save_pretrained(str(staging / ADAPTER_DIR))
        merge_check = None
        if merge:
            merge_check = merge_checked(built)
            write_language_model(model.language_model, tokenizer, staging / LANGUAGE_MODEL_DIR, dtype)
            write_openflamingo(model, staging / OPENFLAMINGO_DIR, dtype)
        (staging / EXPORT_CONFIG).write_text(json.dumps(export_config(source, built.image_size, merge, dtype_name), indent=2))
        summary = model_card.training_summary(model_card.find_run_dir(Path(checkpoint)))
        (staging / MODEL_CARD).write_text(model_card.render(source.model_config, lora, merge, dtype_name, summary))
        about = {"format": EXPORT_FORMAT, "created": datetime.now(timezone.utc).isoformat(),
                 "versions": versions(), "source": {"path": str(Path(checkpoint).resolve()),
                                                    "kind": source.kind, "adapter": str(source.adapter_dir.resolve())},
                 "lora": lora, "merged": merge, "dtype": dtype_name, "merge_check": merge_check}
        write_manifest(staging, about, size_key=EXPORT_SIZE)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out

