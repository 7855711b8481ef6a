"""CLIP ViT weights in the forms people hold, reduced to open_clip's `VisionTransformer` names.

Forms (`model.clip_weights`, detected from the path):
  open_clip      a CLIP state dict file: open_clip's hub cache (`open_clip_model.safetensors`,
                 `open_clip_pytorch_model.bin`) or any `.pt/.bin/.safetensors` with `visual.*` keys;
  torchscript    OpenAI's released archive (`ViT-L-14.pt`), read by `jit_archive` without running it;
  transformers   a `CLIPModel` / `CLIPVisionModel` `save_pretrained` directory (`openai/clip-vit-large-patch14`),
                 loaded by transformers itself (weights-only) and renamed here: the separate q/k/v
                 projections are concatenated into `in_proj_*`, `visual_projection.weight` is `proj.T`.
A `CLIPVisionModel` directory has no projection: `proj` is then absent (OpenFlamingo uses the patch
tokens before `ln_post`, which never pass through it) and the result says so.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmgpt.models.jit_archive import is_torchscript_archive, read_torchscript_state
from mmgpt.models.pretrained import WeightsError, load_state_file, read_meta_state, tensor_summary, unwrap

_HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_HF_TOP = {"embeddings.patch_embedding.weight": "conv1.weight", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}
OPTIONAL_WITHOUT_PROJECTION = ("proj",)


@dataclass
class ClipWeights:
    """The `visual.*` tensors of a CLIP checkpoint under open_clip's ViT names, and where they came from."""

    path: str
    form: str  # open_clip | torchscript | transformers
    visual: dict[str, Tensor]
    absent: list[str] = field(default_factory=list)  # our ViT tensors the form does not carry

    def describe(self) -> str:
        note = f" (no {', '.join(self.absent)}: unused by the patch tokens)" if self.absent else ""
        return f"{self.path}: CLIP ViT in {self.form} form, {tensor_summary(self.visual)}{note}"


def _visual(state: dict[str, Tensor], path: Path, form: str) -> dict[str, Tensor]:
    visual = {k[len("visual."):]: v for k, v in unwrap(state).items() if k.startswith("visual.")}
    if not visual:
        raise WeightsError(f"{path}: no 'visual.*' keys in this {form} file; expected a CLIP checkpoint")
    return visual


def hf_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIP vision names (`vision_model.*`, `visual_projection.weight`) -> open_clip ViT names."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()
            continue
        key = key.removeprefix("vision_model.")
        layer = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key == "embeddings.class_embedding":
            out["class_embedding"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer[1], layer[3]), {})[layer[2][-6]] = value
        elif layer and layer[2] in _HF_LAYER:
            out[f"transformer.resblocks.{layer[1]}.{_HF_LAYER[layer[2]]}.{layer[3]}"] = value
        elif not key.endswith("position_ids"):  # a buffer of older transformers versions
            out[f"<unmapped transformers key> {key}"] = value
    for (index, kind), parts in qkv.items():  # open_clip's MultiheadAttention packs [q; k; v]
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def _read_transformers_dir(path: Path, meta: bool) -> tuple[dict[str, Tensor], list[str]]:
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in ("clip", "clip_vision_model"):
        raise WeightsError(f"{path}: config.json model_type {config.get('model_type')!r} is not a CLIP model")
    if config["model_type"] == "clip":  # the whole CLIPModel: its text tower is read and dropped
        cls = CLIPModel
    else:
        projection = "CLIPVisionModelWithProjection" in (config.get("architectures") or [])
        cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    if meta:  # the architecture its config.json describes, on the meta device: no weights read
        with torch.device("meta"):
            state = cls(cls.config_class.from_pretrained(str(path))).state_dict()
    else:
        state = cls.from_pretrained(str(path), dtype=torch.float32).state_dict()
    # CLIPModel names its tower `vision_model.*`; transformers 5's CLIPVisionModel is the tower itself
    state = {k: v for k, v in state.items() if not k.startswith(("text_model.", "text_projection.", "logit_scale"))}
    absent = [] if "visual_projection.weight" in state else list(OPTIONAL_WITHOUT_PROJECTION)
    return hf_to_open_clip(state), absent


def read_clip_weights(path: str | Path, meta: bool = False) -> ClipWeights:
    """Detect the form of `path` and return its vision tower under open_clip's names (`meta`: names,
    shapes and dtypes only, from headers / the pickle without its storages / config.json)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path}: a directory without config.json; expected a transformers CLIP "
                               "save_pretrained directory (or give an open_clip / TorchScript file)")
        visual, absent = _read_transformers_dir(path, meta)
        return ClipWeights(str(path), "transformers", visual, absent)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    if is_torchscript_archive(path):
        state = read_torchscript_state(path, meta)
        return ClipWeights(str(path), "torchscript", _visual(state, path, "TorchScript"))
    state = read_meta_state(path) if meta else load_state_file(path)
    return ClipWeights(str(path), "open_clip", _visual(state, path, "open_clip"))
