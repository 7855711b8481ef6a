"""OpenFlamingo v1 gated cross-attention ("only attend immediate media") on packed text.

Text is processed as one flat sequence of N tokens split into chunks: maximal runs of tokens
that attend the same image. Each chunk is one varlen segment whose keys are the latents of its
image, or no keys at all (tokens before the first image) which gives an exact zero output.
Parameter names follow OpenFlamingo (`attn.norm/to_q/to_kv/to_out`, `ff.0/1/3`, `attn_gate`,
`ff_gate`) so its checkpoints and the released MultiModal-GPT LoRA load by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from mmgpt_kernels.varlen import varlen_attention
from torch import Tensor, nn

from mmgpt.data.batch import PackedBatch
from mmgpt.models.perceiver import feed_forward


@dataclass
class MediaContext:
    """Everything one forward's cross-attention layers need; passed as the keyword `media=`."""

    latents: Tensor  # [M, num_latents, dim_visual]
    media_index: Tensor  # [N] long, image of each flattened token, -1 = none
    cu_seqlens_q: Tensor  # [C+1] int32, chunk boundaries over the N tokens
    cu_seqlens_k: Tensor  # [C+1] int32, chunk c owns num_latents keys if it has an image, else 0
    max_seqlen_q: int
    max_seqlen_k: int
    chunk_media: Tensor  # [C] long, image of each chunk, -1 = none

    @classmethod
    def from_chunks(cls, latents: Tensor, media_index: Tensor, cu_seqlens_q: Tensor,
                    chunk_media: Tensor, max_seqlen_q: int) -> "MediaContext":
        """Derive key segments from the chunks: num_latents keys per chunk with an image."""
        num_images, num_latents = latents.shape[0], latents.shape[1]
        if chunk_media.numel() and int(chunk_media.max()) >= num_images:
            raise ValueError(f"media index {int(chunk_media.max())} refers past the {num_images} "
                             "images given (each <image> token needs its image)")
        has_image = chunk_media >= 0
        k_lens = has_image.to(torch.int32) * num_latents
        cu_k = torch.zeros(chunk_media.numel() + 1, dtype=torch.int32, device=chunk_media.device)
        cu_k[1:] = torch.cumsum(k_lens, 0)
        return cls(latents=latents, media_index=media_index, cu_seqlens_q=cu_seqlens_q.to(torch.int32),
                   cu_seqlens_k=cu_k, max_seqlen_q=int(max_seqlen_q),
                   max_seqlen_k=num_latents if bool(has_image.any()) else 0, chunk_media=chunk_media)

    @classmethod
    def from_media_index(cls, latents: Tensor, media_index: Tensor) -> "MediaContext":
        """Chunks = maximal runs of equal media_index over the flattened tokens."""
        media_index = media_index.reshape(-1)
        n = media_index.numel()
        starts_mask = torch.ones(n, dtype=torch.bool, device=media_index.device)
        starts_mask[1:] = media_index[1:] != media_index[:-1]
        starts = starts_mask.nonzero().flatten()
        cu_q = torch.cat([starts, starts.new_tensor([n])]).to(torch.int32)
        max_q = int((cu_q[1:] - cu_q[:-1]).max()) if n else 0
        return cls.from_chunks(latents, media_index, cu_q, media_index[starts], max_q)

    @classmethod
    def from_batch(cls, latents: Tensor, batch: PackedBatch) -> "MediaContext":
        """Use the chunks the packer already computed."""
        return cls.from_chunks(latents, batch.media_index, batch.cu_seqlens_q, batch.chunk_media,
                               batch.max_seqlen_q)


class MaskedCrossAttention(nn.Module):
    """Text queries (LayerNorm on text only) attend the latents of their own image."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, media: MediaContext) -> Tensor:
        """x [..., N, dim] (flattened to N tokens in row-major order) -> same shape."""
        shape = x.shape
        q = self.to_q(self.norm(x.reshape(-1, shape[-1]))).unflatten(-1, (self.heads, self.dim_head))
        used = media.chunk_media[media.chunk_media >= 0]
        kv = self.to_kv(media.latents.to(x.dtype))[used].flatten(0, 1)  # [C' * num_latents, 2*inner]
        k, v = (t.unflatten(-1, (self.heads, self.dim_head)) for t in kv.chunk(2, dim=-1))
        out = varlen_attention(q, k, v, media.cu_seqlens_q, media.cu_seqlens_k, media.max_seqlen_q,
                               media.max_seqlen_k, causal=False, backend=self.backend)
        return self.to_out(out.flatten(-2)).reshape(shape)


class GatedCrossAttentionBlock(nn.Module):
    """tanh-gated residual cross-attention + feed-forward; gates start at 0 (identity)."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4,
                 backend: str = "auto"):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head, heads, backend)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, media: MediaContext) -> Tensor:
        x = self.attn(x, media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x
