"""Parameter counts (meta device, no weights) and the analytic FLOP estimate."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmgpt.cli import main
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.models.params import count_params
from mmgpt.perf import StepShape, step_flops
from mmgpt.train.loss import packed_loss
from model_helpers import open_gates
from test_model import SAMPLES, images, pack

LORA_9B_DEFAULT = 23_461_888


def test_cli_9b_default_lora(tmp_path, capsys):
    out = tmp_path / "params.json"
    assert main(["params", "--preset", "9b", "--json", str(out)]) == 0
    counts = json.loads(out.read_text())
    assert counts["trainable_params"] == LORA_9B_DEFAULT
    assert "trainable_params: 23,461,888" in capsys.readouterr().out
    # ViT-L/14 visual tower with projection; LLaMA-7B with 32003 embedding and LM-head rows
    assert counts["vision_encoder_params"] == 303_966_208
    assert counts["language_model_params"] == 6_738_415_616 + 2 * 3 * 4096
    assert counts["total_params"] == sum(v for k, v in counts.items()
                                         if k.endswith("_params") and k not in ("total_params", "trainable_params"))


def test_paper_lora_adds_llama_mlp(tmp_path):
    out = tmp_path / "paper.json"
    assert main(["params", "--preset", "9b", "--lora", "paper", "--json", str(out)]) == 0
    mlp = 32 * 3 * 16 * (4096 + 11008)  # gate/up/down per layer, r = 16
    assert json.loads(out.read_text())["trainable_params"] == LORA_9B_DEFAULT + mlp


@pytest.mark.parametrize("lora", ["default", "none"])
def test_meta_build_counts_like_real_build(lora):
    meta = build_model(ModelConfig(preset="tiny", lora=lora), meta=True).model
    real = build_model(ModelConfig(preset="tiny", lora=lora)).model
    assert all(p.is_meta for p in meta.parameters())
    assert count_params(meta) == count_params(real)


def test_presets_image_sizes():
    assert preset_image_size("tiny") == 32
    assert preset_image_size("9b") == 224
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_image_size("huge")


def test_linear_flops_match_flop_counter():
    """Projection FLOPs against torch's FlopCounterMode on the real tiny forward (no LoRA).

    FlopCounterMode does not count CPU SDPA, so the attention terms are checked by hand below.
    The ViT is counted with grad enabled: the no-grad nn.MultiheadAttention fast path hides its
    projections from the counter.
    """
    model = build_model(ModelConfig(preset="tiny", lora="none")).model
    open_gates(model, 0.5)
    batch = pack(SAMPLES, images(3))
    with FlopCounterMode(display=False) as vision:
        model.vision_encoder(batch.images.clone().requires_grad_())
    with torch.no_grad(), FlopCounterMode(display=False, depth=1) as rest:
        packed_loss(model, model.lm_head, batch)
    counts = rest.get_flop_counts()
    rest_flops = rest.get_total_flops() - sum(counts["Flamingo.vision_encoder"].values())
    est = step_flops("tiny", StepShape.from_batch(batch))
    assert vision.get_total_flops() + rest_flops == est.image_linear + est.text_linear


def test_attention_flops_by_hand():
    batch = pack(SAMPLES, images(3))
    shape = StepShape.from_batch(batch)
    assert shape.attention_pairs == 9 * 10 // 2 + 6 * 7 // 2 + 6 * 7 // 2
    assert shape.media_tokens == 8 + 4  # sample 0: tokens from its first <image>; sample 2: from its <image>
    est = step_flops("tiny", shape)
    d, layers, n_xattn, x_inner, lat = 64, 4, 2, 32, 4
    assert est.text_attention == layers * 4 * d * shape.attention_pairs + n_xattn * 4 * x_inner * lat * 12
    assert est.train == est.image_linear + est.image_attention + 2 * est.text_linear + 3 * est.text_attention


def test_params_help_lists_every_preset_of_the_builder():
    """The help is derived from the builder's table (through a module that imports no torch:
    test_cli_ux checks the parser stays light), so `demo` cannot go missing again."""
    import contextlib
    import io

    from mmgpt.cli import build_parser
    from mmgpt.models.builder import PRESETS

    help_text = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(help_text):
        build_parser().parse_args(["params", "--help"])
    listed = " ".join(help_text.getvalue().split())
    assert " | ".join(PRESETS) in listed and "demo" in listed
