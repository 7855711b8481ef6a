"""OpenFlamingo v1 gated cross-attention ("only attend immediate media") on packed text.

The tokens that pass the blocks (`MediaLayout.token_index`: those of samples with images) are
processed as one flat sequence split into chunks, maximal runs of tokens that attend the same
image (which image: `mmgpt.media`). Each chunk is one varlen segment whose keys are the latents of
its image, or no keys at all, which gives an exact zero output. On the portable sdpa backend the
chunks are not looped over: each chunk is a row attending exactly its image's latents, and chunks
of like length run as ONE unmasked SDPA (a `RowsPlan`, built once per forward in `MediaContext` and
shared by the layers), which is the same attention in a call or two. Parameter names follow OpenFlamingo
(`attn.norm/to_q/to_kv/to_out`, `ff.0/1/3`, `attn_gate`, `ff_gate`) so its checkpoints and the
released MultiModal-GPT LoRA load by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from mmgpt_kernels.varlen import RowsPlan, key_rows_plan, resolve_backend, rows_attention, varlen_attention
from torch import Tensor, nn

from mmgpt.media import MediaLayout
from mmgpt.models.perceiver import feed_forward


@dataclass
class MediaContext:
    """Everything one forward's cross-attention layers need; passed as the keyword `media=`.

    `layout` was computed on the host from token ids alone; the key segments follow from it and
    the number of latents per image, as device tensors for the fused kernels and as host ints for
    the per-segment one, so nothing here reads a device tensor back.
    """

    latents: Tensor  # [M, num_latents, dim_visual]
    layout: MediaLayout

    def __post_init__(self) -> None:
        if self.layout.num_images > self.latents.shape[0]:
            raise ValueError(f"media index {self.layout.num_images - 1} refers past the "
                             f"{self.latents.shape[0]} images given (each <image> token needs its image)")

    @property
    def num_latents(self) -> int:
        return int(self.latents.shape[1])

    @property
    def cu_seqlens_k(self) -> Tensor:
        return self.layout.cu_image_chunks * self.num_latents

    @property
    def seqlens_k(self) -> tuple[int, ...]:
        """Keys per chunk on the host: the latents of its image, or none."""
        return tuple(self.num_latents if has else 0 for has in self.layout.chunk_has_image)

    @property
    def max_seqlen_k(self) -> int:
        return self.num_latents if self.layout.has_keys else 0

    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    def image_plan(self, head_width: int) -> RowsPlan | None:
        """The chunks as rows for the sdpa backend: chunk c attends the latents of image
        `chunk_images[c]`, a chunk without image gives exact zeros. Built once per forward, at
        the first layer that asks (`head_width` = heads x head dim, the same in every block)."""
        if head_width not in self._plans:
            layout = self.layout
            self._plans[head_width] = key_rows_plan(
                layout.chunk_lengths, layout.chunk_images.to(self.latents.device), self.num_latents,
                layout.chunk_has_image, head_width) if layout.has_keys else None
        return self._plans[head_width]


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
        """x [..., N, dim], the N tokens of `media.layout` in row-major order -> same shape."""
        shape = x.shape
        q = self.to_q(self.norm(x.reshape(-1, shape[-1]))).unflatten(-1, (self.heads, self.dim_head))
        layout = media.layout
        sdpa = resolve_backend(self.backend, q) == "sdpa"
        plan = media.image_plan(self.heads * self.dim_head) if sdpa else None
        if plan is not None:  # every image's latents, each chunk's row attending its own image's
            kv = self.to_kv(media.latents.to(x.dtype)).flatten(0, 1)  # [M * L, 2*inner]
            k, v = (t.unflatten(-1, (self.heads, self.dim_head)) for t in kv.chunk(2, dim=-1))
            return self.to_out(rows_attention(q, k, v, plan).flatten(-2)).reshape(shape)
        kv = self.to_kv(media.latents.to(x.dtype))[layout.chunk_images].flatten(0, 1)  # [C' * L, 2*inner]
        k, v = (t.unflatten(-1, (self.heads, self.dim_head)) for t in kv.chunk(2, dim=-1))
        out = varlen_attention(q, k, v, layout.cu_seqlens_q, media.cu_seqlens_k, layout.max_seqlen_q,
                               media.max_seqlen_k, causal=False, backend=self.backend,
                               seqlens_q=layout.chunk_lengths, seqlens_k=media.seqlens_k)
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
        """x [..., T, dim]; only the tokens in `media.layout.token_index` (all when None) change."""
        index = media.layout.token_index
        flat = x.reshape(-1, x.shape[-1])
        y = flat if index is None else flat.index_select(0, index)
        y = self.attn(y, media) * self.attn_gate.tanh() + y
        y = self.ff(y) * self.ff_gate.tanh() + y
        return (y if index is None else flat.index_copy(0, index, y)).reshape(x.shape)
