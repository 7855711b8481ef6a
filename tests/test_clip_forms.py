"""`model.clip_weights` in every form people hold, each written by its real writer (tiny sizes).

open_clip hub files (`torch.save` / safetensors of a real open_clip CLIP's state dict), OpenAI's
TorchScript archive (`torch.jit.trace_module` + `torch.jit.save` of that CLIP: read without running
TorchScript), and transformers `save_pretrained` directories (equal to `CLIPVisionModel`'s
`last_hidden_state[:, 1:]`, OpenFlamingo's pre-`ln_post` patch tokens, within 1e-5 in float32).
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile

import open_clip.model
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from mmgpt.models.clip_forms import read_clip_weights
from mmgpt.models.pretrained import WeightsError
from mmgpt.models.vision import VisionEncoder
from mmgpt.models.builder import get_preset

SPEC = get_preset("tiny").vision  # 32px / 8, width 64, 2 layers, head width 32, output 32


def open_clip_model() -> open_clip.model.CLIP:
    torch.manual_seed(5)
    return open_clip.model.CLIP(
        embed_dim=SPEC.output_dim, quick_gelu=True,
        vision_cfg=dict(image_size=SPEC.image_size, patch_size=SPEC.patch_size, width=SPEC.width,
                        layers=SPEC.layers, head_width=SPEC.head_width),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()


def patch_tokens(clip: open_clip.model.CLIP, x: torch.Tensor) -> torch.Tensor:
    """open_clip's own modules up to (not through) ln_post, CLS dropped."""
    v = clip.visual
    cls = v.class_embedding.expand(x.shape[0], 1, -1)
    emb = torch.cat([cls, v.conv1(x).flatten(2).transpose(1, 2)], 1) + v.positional_embedding
    return v.transformer(v.ln_pre(emb))[:, 1:]


def features(path) -> tuple[torch.Tensor, str]:
    torch.manual_seed(0)
    encoder = VisionEncoder(SPEC)
    said = encoder.load_clip_weights(path)
    with torch.no_grad():
        return encoder(IMAGES), said


IMAGES = torch.randn(2, 3, SPEC.image_size, SPEC.image_size, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """The same open_clip CLIP as open_clip's hub files and as OpenAI's TorchScript release."""
    root = tmp_path_factory.mktemp("clip")
    clip = open_clip_model()
    torch.save(clip.state_dict(), root / "open_clip_pytorch_model.bin")
    save_file(clip.state_dict(), str(root / "open_clip_model.safetensors"))
    text = torch.zeros(1, 8, dtype=torch.long)
    # check_trace=False: the trace is exact; its checker only trips over MultiheadAttention's constants
    scripted = torch.jit.trace_module(clip, {"encode_image": IMAGES[:1], "encode_text": text,
                                             "forward": (IMAGES[:1], text)}, check_trace=False)
    torch.jit.save(scripted, str(root / "ViT-L-14.pt"))
    with torch.no_grad():
        expected = patch_tokens(clip, IMAGES)
    return root, expected


@pytest.mark.parametrize("name, form", [("open_clip_pytorch_model.bin", "open_clip"),
                                        ("open_clip_model.safetensors", "open_clip"),
                                        ("ViT-L-14.pt", "torchscript")])
def test_open_clip_and_torchscript_forms_give_open_clips_patch_tokens(clip_files, name, form):
    root, expected = clip_files
    got, said = features(root / name)
    assert said.startswith(f"{root / name}: CLIP ViT in {form} form")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    reference, _ = features(root / "open_clip_pytorch_model.bin")
    assert torch.equal(got, reference)  # the same weights in each form: identical features


def test_torchscript_reader_returns_every_tensor_of_the_archive(clip_files):
    root, _ = clip_files
    state = read_clip_weights(root / "ViT-L-14.pt").visual
    ours = {k[len("visual."):]: v for k, v in open_clip_model().state_dict().items() if k.startswith("visual.")}
    assert sorted(state) == sorted(ours) and all(torch.equal(state[k], ours[k]) for k in ours)


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_pickle_in_a_torchscript_archive_is_refused_without_running(clip_files, tmp_path):
    root, _ = clip_files
    marker, path = tmp_path / "pwned", tmp_path / "ViT-L-14.pt"
    with zipfile.ZipFile(root / "ViT-L-14.pt") as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info, pickle.dumps(Planted(marker), protocol=2) if info.filename.endswith("/data.pkl") else data)
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(path))}: cannot read the TorchScript archive's "
                                           rf"tensors: refused global {os.system.__module__}\.system; nothing was executed$"):
        features(path)
    assert not marker.exists()


def test_planted_pickle_in_an_open_clip_file_is_refused_without_running(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "open_clip_pytorch_model.bin"
    torch.save({**open_clip_model().state_dict(), "x": Planted(marker)}, path)
    with pytest.raises(WeightsError, match="refused to unpickle global .*nothing was executed"):
        features(path)
    assert not marker.exists()


def hf_clip_config() -> CLIPConfig:
    return CLIPConfig(
        projection_dim=SPEC.output_dim,
        vision_config=dict(hidden_size=SPEC.width, intermediate_size=4 * SPEC.width, num_hidden_layers=SPEC.layers,
                           num_attention_heads=SPEC.width // SPEC.head_width, image_size=SPEC.image_size,
                           patch_size=SPEC.patch_size, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=8))


@pytest.mark.parametrize("cls", [CLIPModel, CLIPVisionModel])
def test_transformers_directory_equals_clip_vision_models_patch_tokens(tmp_path, cls):
    torch.manual_seed(11)
    config = hf_clip_config()
    hf = (cls(config) if cls is CLIPModel else cls(config.vision_config)).eval()
    hf.save_pretrained(tmp_path / "clip-vit-large-patch14")
    vision = hf.vision_model if cls is CLIPModel else hf  # transformers 5: the tower itself
    with torch.no_grad():
        expected = vision(pixel_values=IMAGES).last_hidden_state[:, 1:]
    got, said = features(tmp_path / "clip-vit-large-patch14")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert "in transformers form" in said
    assert ("no proj" in said) == (cls is CLIPVisionModel)
    if cls is CLIPModel:  # the projection arrives too (open_clip keeps it as proj = W.T)
        proj = read_clip_weights(tmp_path / "clip-vit-large-patch14").visual["proj"]
        assert torch.equal(proj, hf.visual_projection.weight.t())


def test_a_directory_that_is_no_clip_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(WeightsError, match=r"model_type 'llama' is not a CLIP model$"):
        read_clip_weights(tmp_path)
