"""FLOP accounting and device peaks, for MFU in the training monitor and the benchmarks.

FLOPs are analytic matmul counts from a preset's dimensions (2 FLOPs per multiply-add), split into
the parts that run forward only (frozen ViT and perceiver: no gradient flows into them) and the
language side, whose backward needs input gradients through every frozen weight (~1x its forward)
and, for attention, ~2x. MFU = these FLOPs / (seconds x the device's dense bf16 peak).
"""
from __future__ import annotations

from dataclasses import dataclass

from mmgpt.contracts import PackedBatch
from mmgpt.models.builder import get_preset


@dataclass
class StepShape:
    """What one (micro-)batch costs; `from_batch` reads it off a PackedBatch."""

    num_tokens: int
    num_images: int
    attention_pairs: int  # self-attention query-key pairs: sum over samples of L*(L+1)/2
    media_tokens: int  # tokens that cross-attend an image (media_index >= 0)
    num_supervised: int
    xattn_tokens: int | None = None  # tokens through the cross-attention blocks (None: all tokens)

    @classmethod
    def from_batch(cls, batch: PackedBatch) -> "StepShape":
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        return cls(num_tokens=batch.num_tokens, num_images=int(batch.images.shape[0]),
                   attention_pairs=int((lengths * (lengths + 1) // 2).sum()),
                   media_tokens=int((batch.media_index >= 0).sum()), num_supervised=batch.num_supervised,
                   xattn_tokens=batch.media_layout.num_tokens if batch.media_layout is not None else 0)


@dataclass
class StepFlops:
    """Forward matmul FLOPs of one step, by the part of the model that does them (LoRA excluded)."""

    image_linear: float  # ViT + perceiver projections: forward only (frozen, no gradient reaches them)
    image_attention: float  # ViT + perceiver score/value products
    text_linear: float  # LLaMA + cross-attention projections, LM head on supervised tokens
    text_attention: float  # self- and cross-attention score/value products

    @property
    def forward(self) -> float:
        return self.image_linear + self.image_attention + self.text_linear + self.text_attention

    @property
    def train(self) -> float:
        """Forward + backward (input gradients ~1x for frozen linears, ~2x for attention), no recompute."""
        return self.image_linear + self.image_attention + 2 * self.text_linear + 3 * self.text_attention


# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, most specific first: the MFU
# denominator when the user gives none.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("A6000", 155e12), ("4090", 165e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Known dense bf16 peak of a GPU named `device_name` (torch.cuda.get_device_name), else None."""
    return next((peak for fragment, peak in PEAK_BF16_FLOPS if fragment in device_name), None)


def step_flops(preset: str, shape: StepShape) -> StepFlops:
    """Analytic FLOPs (2 per multiply-add) of a preset's architecture on one batch shape."""
    p = get_preset(preset)
    v, ll = p.vision, p.llama
    d, inter, layers = ll["hidden_size"], ll["intermediate_size"], ll["num_hidden_layers"]
    n_xattn = layers // p.cross_attn_every_n_layers
    w, patches, lat, images = v.width, v.num_patches, p.num_latents, shape.num_images
    p_inner = p.perceiver_heads * p.perceiver_dim_head
    x_inner = p.xattn_heads * p.xattn_dim_head
    vit_linear = (2 * 3 * v.patch_size**2 * w * patches  # patch embedding
                  + v.layers * 2 * 12 * w * w * (patches + 1)  # qkv, out, MLP on patches + CLS
                  + 2 * w * v.output_dim)  # pooled projection
    perceiver_linear = p.perceiver_depth * (2 * (2 * w * p_inner + 8 * w * w) * lat  # to_q, to_out, ff
                                            + 2 * 2 * w * p_inner * (patches + lat))  # to_kv(media, latents)
    image_attention = (v.layers * 4 * w * (patches + 1) ** 2
                       + p.perceiver_depth * 4 * p_inner * lat * (patches + lat))
    xattn_tokens = shape.num_tokens if shape.xattn_tokens is None else shape.xattn_tokens
    text_linear = (shape.num_tokens * layers * 2 * (4 * d * d + 3 * d * inter)
                   + xattn_tokens * n_xattn * 2 * (2 * d * x_inner + 8 * d * d)
                   + n_xattn * images * 2 * 2 * w * x_inner * lat  # to_kv on the latents
                   + shape.num_supervised * 2 * d * ll["vocab_size"])
    text_attention = (layers * 4 * d * shape.attention_pairs
                      + n_xattn * 4 * x_inner * lat * shape.media_tokens)
    return StepFlops(image_linear=float(images * (vit_linear + perceiver_linear)),
                     image_attention=float(images * image_attention),
                     text_linear=float(text_linear), text_attention=float(text_attention))
