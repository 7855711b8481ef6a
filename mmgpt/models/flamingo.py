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

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmgpt.contracts import IGNORE_INDEX, PackedBatch
from mmgpt.models.attention import ATTN_IMPLEMENTATION
from mmgpt.models.cross_attention import GatedCrossAttentionBlock, MediaContext
from mmgpt.models.perceiver import PerceiverResampler
from mmgpt.models.vision import VisionEncoder

__all__ = ["Flamingo", "FlamingoLayer", "LossOutput", "MediaContext"]

LOSS_CHUNK_TOKENS = 1024  # supervised positions per LM-head chunk: bounds logits memory to chunk x V


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


@dataclass
class LossOutput:
    """Summed (not averaged) loss: the training loop divides by the GLOBAL supervised count."""

    loss_sum: Tensor  # scalar, float32 (float64 for a float64 model), sum of token cross-entropies
    num_supervised: int
    sample_loss_sum: Tensor  # [S] float32, detached
    sample_count: Tensor  # [S] long


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
    """The MultiModal-GPT model; `lang_encoder` is the LLaMA (or the peft model wrapping it)."""

    def __init__(self, vision_encoder: VisionEncoder, perceiver: PerceiverResampler,
                 lang_encoder: LlamaForCausalLM, media_token_id: int):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.perceiver = perceiver
        self.lang_encoder = lang_encoder
        self.media_token_id = media_token_id

    @property
    def llama(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM itself, under any peft wrapper (LoRA layers live inside it)."""
        inner = self.lang_encoder
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    def cross_attn_blocks(self) -> list[GatedCrossAttentionBlock]:
        return [layer.gated_cross_attn_layer for layer in self.llama.model.layers
                if layer.gated_cross_attn_layer is not None]

    def init_gates(self, value: float) -> None:
        """Set every attn/ff gate (tests: make cross-attention visible; 0 restores identity)."""
        with torch.no_grad():
            for block in self.cross_attn_blocks():
                block.attn_gate.fill_(value)
                block.ff_gate.fill_(value)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each FlamingoLayer in backward (non-reentrant: frozen inputs + LoRA work)."""
        for layer in self.llama.model.layers:
            layer.gradient_checkpointing = enabled
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def encode_images(self, images: Tensor) -> Tensor:
        """[M, 3, H, W] -> perceiver latents [M, num_latents, dim_visual]; the ViT runs without grad."""
        dtype = self.perceiver.latents.dtype
        if images.shape[0] == 0:
            return self.perceiver.latents.new_zeros(0, *self.perceiver.latents.shape)
        with torch.no_grad():
            tokens = self.vision_encoder(images.to(dtype))
        return self.perceiver(tokens)

    def _packed_hidden(self, batch: PackedBatch) -> Tensor:
        """Final hidden states [T, dim] of a packed batch (one row, causal within each sample)."""
        media = None if batch.media is None else MediaContext(self.encode_images(batch.images), batch.media)
        out = self.llama.model(
            input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], media=media,
            cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen, use_cache=False)
        return out.last_hidden_state[0]

    def forward(self, batch: PackedBatch) -> LossOutput:
        """Packed training forward; the LM head only runs on supervised positions, in chunks."""
        hidden = self._packed_hidden(batch)
        positions = (batch.labels != IGNORE_INDEX).nonzero().flatten()
        targets = batch.labels[positions]
        token_loss = self._supervised_token_loss(hidden[positions], targets)
        samples = batch.sample_index[positions]
        num_samples = batch.num_samples
        sample_loss = torch.zeros(num_samples, dtype=torch.float32, device=hidden.device)
        sample_loss.index_add_(0, samples, token_loss.detach().float())
        loss_sum = token_loss.sum() if positions.numel() else hidden.sum().float() * 0.0
        return LossOutput(loss_sum=loss_sum, num_supervised=int(positions.numel()),
                          sample_loss_sum=sample_loss,
                          sample_count=torch.bincount(samples, minlength=num_samples))

    def _supervised_token_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Per-token float32 cross-entropy; under grad each chunk's logits are recomputed in backward."""
        losses = []
        for h, t in zip(hidden.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS)):
            if torch.is_grad_enabled():
                losses.append(checkpoint(self._chunk_loss, h, t, use_reentrant=False))
            else:
                losses.append(self._chunk_loss(h, t))
        return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)

    def _chunk_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        logits = self.llama.lm_head(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
        return F.cross_entropy(logits, targets, reduction="none")

    def batch_logits(self, batch: PackedBatch) -> Tensor:
        """[T, V] logits of a packed batch (tests and leak checks only: materialises all logits)."""
        return self.llama.lm_head(self._packed_hidden(batch))

    def lm_forward(self, input_ids: Tensor, media: MediaContext | None, position_ids: Tensor | None = None,
                   attention_mask: Tensor | None = None, cache=None, use_cache: bool = False,
                   **kwargs) -> CausalLMOutputWithPast:
        """HF-style forward on [B, T] ids (generation, tests); `media.layout` covers B x T tokens.

        One sequence per row (left padding via attention_mask is fine); packed rows must go
        through `forward`/`batch_logits`, which pass the sample boundaries to self-attention.
        """
        return self.llama(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=use_cache, media=media, **kwargs)

