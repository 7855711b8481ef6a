"""Flamingo: frozen ViT -> Perceiver resampler -> LLaMA with gated cross-attention layers.

The language model is composed, not patched: each `LlamaForCausalLM.model.layers[i]` becomes a
`FlamingoLayer(decoder_layer, gated_cross_attn_layer or None)`, so the state-dict keys are
OpenFlamingo v1's (`...layers.{i}.decoder_layer.*`, `...layers.{i}.gated_cross_attn_layer.*`).
Images reach the layers as the keyword argument `media=MediaContext(...)`, which transformers
forwards to every decoder layer; no media is stored on modules, so packed rows, KV caches and
activation checkpointing all see exactly the media of the current call. `media=None` (or a layout
with no token) skips every cross-attention block: language-only samples bypass them, as in the
original MultiModal-GPT.
"""
from __future__ import annotations

from functools import partial

import torch
from mmgpt_kernels.varlen import causal_rows_plan, resolve_backend
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmgpt.media import MediaLayout
from mmgpt.models.attention import ATTN_IMPLEMENTATION
from mmgpt.models.cross_attention import GatedCrossAttentionBlock, MediaContext
from mmgpt.models.perceiver import PerceiverResampler
from mmgpt.models.vision import VisionEncoder

__all__ = ["Flamingo", "FlamingoLayer", "MediaContext"]


def checkpoint_every(mode: bool | int) -> int:
    """Activation-checkpointing mode as "every k-th layer": 0 off, 1 every layer (full)."""
    every = int(mode)
    if every < 0:
        raise ValueError(f"gradient_checkpointing must be true/false or a layer interval >= 0, got {mode!r}")
    return every


class FlamingoLayer(GradientCheckpointingLayer):
    """A LLaMA decoder layer, preceded by a gated cross-attention block when one is given."""

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionBlock | None):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.gated_cross_attn_layer = gated_cross_attn_layer

    def forward(self, hidden_states: Tensor, *args, media: MediaContext | None = None, **kwargs) -> Tensor:
        if self.gated_cross_attn_layer is not None and media is not None and media.layout.num_tokens:
            hidden_states = self.gated_cross_attn_layer(hidden_states, media)
        return self.decoder_layer(hidden_states, *args, **kwargs)


def add_cross_attention(llama: LlamaForCausalLM, dim_visual: int, every_n_layers: int,
                        heads: int, dim_head: int, backend: str = "auto") -> None:
    """Wrap every decoder layer; insert a cross-attention block before layer i when (i+1) % n == 0.

    Also routes self-attention to the "mmgpt_varlen" implementation; `backend` picks the
    mmgpt_kernels backend of both self- and cross-attention.
    """
    layers = llama.model.layers
    dim = llama.config.hidden_size
    for i in range(len(layers)):
        xattn = (GatedCrossAttentionBlock(dim, dim_visual, dim_head=dim_head, heads=heads, backend=backend)
                 if (i + 1) % every_n_layers == 0 else None)
        layers[i] = FlamingoLayer(layers[i], xattn)
    llama.config._attn_implementation = ATTN_IMPLEMENTATION
    llama.config.mmgpt_attn_backend = backend


class Flamingo(nn.Module):
    """The MultiModal-GPT model; `lang_encoder` is the LLaMA (or the peft model wrapping it),
    `language_model` always the LLaMA itself."""

    def __init__(self, vision_encoder: VisionEncoder, perceiver: PerceiverResampler,
                 lang_encoder: LlamaForCausalLM, image_token_id: int):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.perceiver = perceiver
        self.lang_encoder = lang_encoder
        self.image_token_id = image_token_id

    @property
    def language_model(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM itself, under any peft wrapper (LoRA layers live inside it).

        `lang_encoder` keeps OpenFlamingo's name (it is the state-dict prefix of every released
        checkpoint) and is the peft model after LoRA; this is always the plain LLaMA inside it."""
        inner = self.lang_encoder
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    def cross_attn_blocks(self) -> list[GatedCrossAttentionBlock]:
        return [layer.gated_cross_attn_layer for layer in self.language_model.model.layers
                if layer.gated_cross_attn_layer is not None]

    def set_attn_backend(self, backend: str) -> None:
        """Pick the mmgpt_kernels backend of self- and cross-attention (auto | flash_attn |
        torch_varlen | sdpa); modules read it at call time, so this switches a built model."""
        self.language_model.config.mmgpt_attn_backend = backend
        for block in self.cross_attn_blocks():
            block.attn.backend = backend

    def attention_backends(self, dtype: torch.dtype, device: torch.device | str) -> dict[str, str]:
        """The backend self- and cross-attention run for `dtype` activations on `device`, from the
        resolver varlen_attention itself calls (head dims decide whether fused kernels fit)."""
        config = self.language_model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        probe = lambda heads, dim: torch.empty(0, heads, dim, dtype=dtype, device=device)  # noqa: E731
        ran = {"self_attention": resolve_backend(config.mmgpt_attn_backend,
                                                 probe(config.num_attention_heads, head_dim))}
        for block in self.cross_attn_blocks()[:1]:
            ran["cross_attention"] = resolve_backend(block.attn.backend,
                                                     probe(block.attn.heads, block.attn.dim_head))
        return ran

    def set_gradient_checkpointing(self, mode: bool | int) -> None:
        """Recompute FlamingoLayers in backward (non-reentrant: frozen inputs + LoRA work).

        `mode`: False/0 off, True/1 every layer, k >= 2 every k-th layer (layers 0, k, 2k, ...),
        which trades memory for less recompute on cards that cannot hold every activation.
        """
        every = checkpoint_every(mode)
        for i, layer in enumerate(self.language_model.model.layers):
            layer.gradient_checkpointing = every > 0 and i % every == 0
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def encode_images(self, images: Tensor) -> Tensor:
        """[M, 3, H, W] -> perceiver latents [M, num_latents, dim_visual]; the ViT runs without grad."""
        dtype = self.perceiver.latents.dtype
        if images.shape[0] == 0:
            return self.perceiver.latents.new_zeros(0, *self.perceiver.latents.shape)
        with torch.no_grad():
            tokens = self.vision_encoder(images.to(dtype))
        return self.perceiver(tokens)

    @property
    def lm_head(self) -> nn.Module:
        return self.language_model.lm_head

    def forward(self, input_ids: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                seqlens: tuple[int, ...], images: Tensor, media_layout: MediaLayout | None) -> Tensor:
        """Final hidden states [T, dim] of one packed sequence of T tokens (several samples).

        Self-attention is causal inside each `cu_seqlens` segment (`seqlens`: their host lengths);
        `media_layout` is the host-built cross-attention layout (None: no sample has an image, every
        block is skipped). The loss lives in mmgpt/train/loss.py; `PackedBatch.model_inputs()`
        gives these arguments.

        The decoder stack is driven here rather than through `LlamaModel.forward`: that one
        always builds a mask first, and its packed-sequence detection reads position_ids back to
        the host (a sync per step) for a mask the varlen kernels never use.

        On the portable sdpa backend the self-attention `RowsPlan` (a few batched SDPA calls per
        layer instead of one per sample) is built here once, from the host lengths, for every layer.
        """
        context = None if media_layout is None else MediaContext(self.encode_images(images), media_layout)
        llama = self.language_model.model
        hidden = llama.embed_tokens(input_ids[None])
        config = llama.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        probe = hidden.new_empty(0, config.num_attention_heads, head_dim)  # what self-attention resolves on
        plan = None
        if resolve_backend(config.mmgpt_attn_backend, probe) == "sdpa":
            plan = causal_rows_plan(seqlens, config.num_attention_heads * head_dim, hidden.device)
        positions = position_ids[None]
        rope = llama.rotary_emb(hidden, position_ids=positions)
        for layer in llama.layers[: llama.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope,
                           media=context, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                           max_length_q=max_seqlen, max_length_k=max_seqlen, mmgpt_seq_lens=seqlens,
                           mmgpt_attn_plan=plan)
        return llama.norm(hidden)[0]

    def lm_forward(self, input_ids: Tensor, media: MediaContext | None, position_ids: Tensor | None = None,
                   attention_mask: Tensor | None = None, cache=None, use_cache: bool = False,
                   **kwargs) -> CausalLMOutputWithPast:
        """HF-style forward on [B, T] ids (generation, probes); `media.layout` covers B x T tokens.

        One sequence per row (left padding via attention_mask is fine); packed rows must go
        through `forward`, which passes the sample boundaries to self-attention.
        """
        return self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=use_cache, media=media, **kwargs)

