"""Model presets and `build_model`: the one place that assembles Flamingo from a ModelConfig.

`build_model` returns a `BuiltModel`: the Flamingo with the settings every user of it needs (its
tokenizer, image size and CLIP transform, media attention), so that data, evaluation and chat
read them from the model they run instead of each being handed them beside it.

Random presets are initialised from `cfg.seed` (torch.manual_seed before construction, fixed
construction order), so every process that rebuilds a config — each DeepSpeed rank, export, chat
— gets bit-identical frozen weights. Presets:
  tiny   seconds on a CPU: ViT 32px/8 x 64w x 2L, LLaMA 64h x 4L on the bundled 1003-token tokenizer, n=2.
  demo   tiny with a 10x larger random LM head (std 0.2): what `launch/demo.sh` trains. With LLaMA's
         std 0.02 a unit-RMS final hidden state gives logits of std 0.16 whatever LoRA does, so the
         frozen head caps how peaked a prediction can get and the loss barely moves (6.9 -> 6.8).
         Its cross-attention gates start open (tanh(1) = 0.76), the demo's stand-in for
         OpenFlamingo's pretraining: the gates are frozen, and at 0 (a fresh OpenFlamingo block)
         the images never reach the language model whatever LoRA learns. Never in `9b`, whose
         gates come from the OpenFlamingo checkpoint.
  small  CPU benchmarks: ViT 224px/16 x 384w x 6L, LLaMA 1024h x 4L with the 32003-entry LLaMA
         vocabulary (the tiny tokenizer's ids are a subset), perceiver depth 2, n=2.
  9b     OpenFlamingo-9B: ViT-L/14 (224px) + LLaMA-7B (32003 vocab), perceiver depth 6, n=4.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mmgpt.image_transform import Transform, clip_transform
from mmgpt.media import MediaAttention, check_media_attention
from mmgpt.models import pretrained
from mmgpt.models.flamingo import Flamingo, add_cross_attention, checkpoint_every
from mmgpt.models.lora import LoraSpec, apply_lora, lora_spec
from mmgpt.models.perceiver import PerceiverResampler
from mmgpt.models.preset_names import PRESET_NAMES
from mmgpt.contracts import IMAGE
from mmgpt.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from mmgpt.models.vision import VIT_L_14, VisionEncoder, VisionSpec

log = logging.getLogger(__name__)

LLAMA_VOCAB = 32003  # LLaMA's 32000 + <|endofchunk|>, <image>, <PAD>
LLAMA_IMAGE_TOKEN_ID = 32001
TINY_VOCAB = 1003  # the bundled tiny tokenizer: 1000 pieces + the three special tokens


@dataclass(frozen=True)
class Preset:
    """Architecture of one model size (the LLaMA part is ignored when llama_path is given)."""

    vision: VisionSpec
    llama: dict = field(hash=False)  # LlamaConfig keyword arguments (vocab_size included)
    cross_attn_every_n_layers: int
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    num_latents: int = 64
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    tokenizer_dir: Path | None = None  # bundled tokenizer used when no tokenizer/llama path is given
    lm_head_std: float | None = None  # random LM head init (None: LLaMA's initializer_range, 0.02)
    gate_init: float = 0.0  # attn_gate and ff_gate before tanh (0: OpenFlamingo's init, closed)


TINY = Preset(
    vision=VisionSpec(image_size=32, patch_size=8, width=64, layers=2, head_width=32, output_dim=32),
    llama=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512, vocab_size=TINY_VOCAB),
    cross_attn_every_n_layers=2, perceiver_depth=2, perceiver_heads=2, perceiver_dim_head=16,
    num_latents=4, xattn_heads=2, xattn_dim_head=16, tokenizer_dir=TINY_TOKENIZER_DIR)

PRESETS: dict[str, Preset] = {
    "tiny": TINY,
    "demo": replace(TINY, lm_head_std=0.2, gate_init=1.0),
    "small": Preset(
        vision=VisionSpec(image_size=224, patch_size=16, width=384, layers=6, head_width=64, output_dim=384),
        llama=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16,
                   num_key_value_heads=16, max_position_embeddings=4096, vocab_size=LLAMA_VOCAB),
        cross_attn_every_n_layers=2, perceiver_depth=2, tokenizer_dir=TINY_TOKENIZER_DIR),
    "9b": Preset(
        vision=VIT_L_14,
        llama=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, max_position_embeddings=2048, vocab_size=LLAMA_VOCAB),
        cross_attn_every_n_layers=4),
}
if tuple(PRESETS) != PRESET_NAMES:  # the parsers' help lists PRESET_NAMES without importing this module
    raise RuntimeError(f"mmgpt/models/preset_names.py lists {PRESET_NAMES}, builder.PRESETS has {tuple(PRESETS)}")


@dataclass
class ModelConfig:
    """What to build: a preset plus optional local weights (all paths are local files/dirs)."""

    preset: str = "tiny"
    llama_path: str | None = None  # HF LLaMA directory (weights + tokenizer)
    tokenizer_path: str | None = None  # defaults to llama_path, else the preset's bundled tokenizer
    # CLIP: open_clip state dict file, OpenAI's TorchScript ViT-L-14.pt, or a transformers CLIP dir
    clip_weights: str | None = None
    openflamingo_checkpoint: str | None = None  # OpenFlamingo checkpoint.pt (v1 or v2 layout)
    lora_checkpoint: str | None = None  # MultiModal-GPT LoRA checkpoint (released layout)
    # LoRA: a preset name (default | paper | none) or LoraSpec(preset, r, alpha, dropout, targets) /
    # its YAML mapping; unset fields come from the preset (mmgpt/models/lora.py)
    lora: str | LoraSpec = "default"
    seed: int = 0
    # Activation checkpointing: false (off), true (every layer) or k (every k-th layer). See
    # configs/mmgpt_9b.yaml for what fits which card.
    gradient_checkpointing: bool | int = False
    attn_backend: str = "auto"  # mmgpt_kernels backend: auto | flash_attn | torch_varlen | sdpa
    # Which image a token cross-attends (mmgpt/media.py): next (the released MultiModal-GPT and
    # OpenFlamingo v1 default) | previous (OpenFlamingo v2) | random (v1's placement augmentation)
    media_attention: MediaAttention = "next"

    def __post_init__(self) -> None:
        check_media_attention(self.media_attention)
        checkpoint_every(self.gradient_checkpointing)
        lora_spec(self.lora)  # an unknown preset / target or a bad r is refused when the config is read


# ModelConfig fields holding file-system paths (a config file's relative paths resolve against its folder)
MODEL_PATH_FIELDS = ("llama_path", "tokenizer_path", "clip_weights", "openflamingo_checkpoint", "lora_checkpoint")


@dataclass(frozen=True)
class BuiltModel:
    """A built or loaded model with its own settings: what the packer, the evaluator, chat and the
    benchmarks read from the model they run (so none of them can be handed a different one)."""

    model: Flamingo
    tokenizer: PreTrainedTokenizerBase | None  # None only for a meta build without a tokenizer path
    image_size: int  # side of the square CLIP input
    media_attention: MediaAttention  # which image each token cross-attends (mmgpt/media.py)

    def __post_init__(self) -> None:
        check_media_attention(self.media_attention)

    @property
    def image_token_id(self) -> int:
        return self.model.image_token_id

    @functools.cached_property
    def transform(self) -> Transform:
        """The CLIP preprocessing of this model's input size (what training's data side applies)."""
        return clip_transform(self.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def preset_image_size(preset: str) -> int:
    """Side of the square CLIP input of a preset (the data side builds its transform from it)."""
    return get_preset(preset).vision.image_size


def tokenizer_path(cfg: ModelConfig) -> str | Path | None:
    """The tokenizer directory a run of `cfg` loads: model.tokenizer_path, else llama_path, else the
    preset's bundled one (None: the preset has none, e.g. 9b without a LLaMA directory)."""
    return cfg.tokenizer_path or cfg.llama_path or get_preset(cfg.preset).tokenizer_dir


def _load_tokenizer(cfg: ModelConfig, preset: Preset) -> PreTrainedTokenizerBase | None:
    path = tokenizer_path(cfg)
    return load_tokenizer(path) if path is not None else None


def _build_llama(cfg: ModelConfig, preset: Preset, tokenizer: PreTrainedTokenizerBase | None,
                 dtype: torch.dtype, meta: bool) -> LlamaForCausalLM:
    """LLaMA from a local HF directory (config only when meta), else the preset's random one."""
    if cfg.llama_path is not None:
        if meta:
            llama = LlamaForCausalLM(LlamaConfig.from_pretrained(cfg.llama_path))
        else:
            try:
                llama = LlamaForCausalLM.from_pretrained(cfg.llama_path, dtype=dtype)
            except pickle.UnpicklingError as err:
                raise pretrained.refused_by_weights_only(cfg.llama_path, err) from None
        # meta: shapes only (the mean initialisation of new rows cannot run without data)
        llama.resize_token_embeddings(len(tokenizer), mean_resizing=not meta)
        return llama
    if tokenizer is not None and len(tokenizer) > preset.llama["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but preset {cfg.preset!r} has a "
                         f"vocabulary of {preset.llama['vocab_size']}")
    config = LlamaConfig(**preset.llama, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=None)
    llama = LlamaForCausalLM(config)
    if preset.lm_head_std is not None:  # rescaled, not redrawn: the random stream after it is tiny's
        with torch.no_grad():
            llama.lm_head.weight.mul_(preset.lm_head_std / config.initializer_range)
    return llama


def _open_gates(llama: LlamaForCausalLM, value: float) -> None:
    """Every gated cross-attention block's two gates set to `value` (see the `demo` preset)."""
    with torch.no_grad():
        for layer in llama.model.layers:
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.attn_gate.fill_(value)
                layer.gated_cross_attn_layer.ff_gate.fill_(value)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                meta: bool = False, preset: Preset | None = None) -> BuiltModel:
    """Assemble (and load) the model; everything but LoRA is frozen.

    meta=True builds the architecture without memory (parameter and FLOP counting); weights
    files are then not read. The tokenizer is None only for a meta build with no tokenizer path.
    `preset` overrides `cfg.preset`'s architecture (benchmarks: e.g. the 9B's depth at tiny widths).
    """
    preset = get_preset(cfg.preset) if preset is None else preset
    tokenizer = _load_tokenizer(cfg, preset)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE) if tokenizer is not None else LLAMA_IMAGE_TOKEN_ID
    torch.manual_seed(cfg.seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        vision = VisionEncoder(preset.vision)
        perceiver = PerceiverResampler(dim=preset.vision.width, depth=preset.perceiver_depth,
                                       dim_head=preset.perceiver_dim_head, heads=preset.perceiver_heads,
                                       num_latents=preset.num_latents)
        llama = _build_llama(cfg, preset, tokenizer, dtype, meta)
        add_cross_attention(llama, dim_visual=preset.vision.width,
                            every_n_layers=preset.cross_attn_every_n_layers,
                            heads=preset.xattn_heads, dim_head=preset.xattn_dim_head,
                            backend=cfg.attn_backend)
        if preset.gate_init:
            _open_gates(llama, preset.gate_init)
    model = Flamingo(vision, perceiver, llama, image_token_id)
    if not meta:
        if cfg.clip_weights:
            log.info("%s", vision.load_clip_weights(cfg.clip_weights))
        if cfg.openflamingo_checkpoint:
            report = pretrained.load_openflamingo(model, cfg.openflamingo_checkpoint)
            log.info("%s", report)
    model.requires_grad_(False)
    spec = lora_spec(cfg.lora)
    if spec is not None:
        model.lang_encoder = apply_lora(model.lang_encoder, spec)
        if cfg.lora_checkpoint and not meta:
            report = pretrained.load_lora(model, cfg.lora_checkpoint)
            log.info("%s", report)
            if cfg.media_attention != "next":
                log.warning("media_attention=%r, but the released MultiModal-GPT LoRA was trained with "
                            "'next' (OpenFlamingo v1 without placement augmentation)", cfg.media_attention)
    elif cfg.lora_checkpoint:
        raise ValueError("lora_checkpoint given with lora='none'")
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    if not meta:
        model.to(device=device, dtype=dtype)
    return BuiltModel(model, tokenizer, preset.vision.image_size, cfg.media_attention)
