"""The training loss: chunked LM head + cross-entropy on the supervised positions only.

Kept out of the model (which returns hidden states) so that other losses, fused kernels and
evaluation reuse the same pieces. The LM head never sees unsupervised positions and never
materialises [T, V] logits: each chunk of `LOSS_CHUNK_TOKENS` positions is projected, scored and
(under grad) recomputed in backward, so logits memory is bounded by chunk x V. Sums, not means:
the training loop divides by the GLOBAL supervised count (mmgpt/train/loop.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmgpt.contracts import PackedBatch

LOSS_CHUNK_TOKENS = 1024  # supervised positions per LM-head chunk


@dataclass
class LossOutput:
    """Summed (not averaged) loss of one packed batch, and its per-sample parts."""

    loss_sum: Tensor  # scalar, float32 (float64 for a float64 model), sum of token cross-entropies
    num_supervised: int
    sample_loss_sum: Tensor  # [S] float32, detached
    sample_count: Tensor  # [S] long


def token_losses(lm_head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """Per-token float32 cross-entropy of `hidden` [N, D] against `targets` [N], in chunks."""
    def chunk_loss(h: Tensor, t: Tensor) -> Tensor:
        logits = lm_head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
        return F.cross_entropy(logits, t, reduction="none")

    losses = []
    for h, t in zip(hidden.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS)):
        if torch.is_grad_enabled():
            losses.append(checkpoint(chunk_loss, h, t, use_reentrant=False))
        else:
            losses.append(chunk_loss(h, t))
    return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)


def supervised_loss(lm_head: nn.Module, hidden: Tensor, batch: PackedBatch) -> LossOutput:
    """LossOutput of a packed batch from its final hidden states [T, D]. The supervised positions
    come from the packer (`batch.supervised_index`, built on the host), so nothing here syncs."""
    positions = batch.supervised_index
    token_loss = token_losses(lm_head, hidden[positions], batch.labels[positions])
    samples = batch.sample_index[positions]
    sample_loss = torch.zeros(batch.num_samples, dtype=torch.float32, device=hidden.device)
    sample_loss.index_add_(0, samples, token_loss.detach().float())
    sample_count = torch.zeros(batch.num_samples, dtype=torch.long, device=hidden.device)
    sample_count.index_add_(0, samples, torch.ones_like(samples))
    # an empty micro-batch still needs a graph: DeepSpeed backpropagates every micro-batch
    loss_sum = token_loss.sum() if positions.numel() else hidden.sum().float() * 0.0
    return LossOutput(loss_sum=loss_sum, num_supervised=int(positions.numel()),
                      sample_loss_sum=sample_loss, sample_count=sample_count)


def packed_loss(model: Callable[..., Tensor], lm_head: nn.Module, batch: PackedBatch) -> LossOutput:
    """Forward `batch` through `model` (a Flamingo, or the DeepSpeed engine wrapping one) and score it."""
    return supervised_loss(lm_head, model(**batch.model_inputs()), batch)
