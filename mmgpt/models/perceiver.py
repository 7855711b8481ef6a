"""OpenFlamingo's PerceiverResampler: image patch tokens -> a fixed number of latents.

Parameter names follow OpenFlamingo exactly (`latents`, `layers.{i}.0.{norm_media,norm_latents,
to_q,to_kv,to_out}`, `layers.{i}.1.{0,1,3}`, `norm`) so its checkpoints load without renaming.
One image per media slot: no time or frame embeddings.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear without biases (keys 0, 1, 3)."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents); media and latents are normalised separately."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """media [M, P, D], latents [M, L, D] -> [M, L, D]."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(-2))


class PerceiverResampler(nn.Module):
    """depth x (attention + feed-forward) residual blocks over learned latents, then LayerNorm."""

    def __init__(self, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8,
                 num_latents: int = 64, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, media: Tensor) -> Tensor:
        """media [M, P, D] patch tokens -> [M, num_latents, D]."""
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
