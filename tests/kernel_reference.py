"""Plain float64 varlen attention: the ground truth every backend is tested against."""
from __future__ import annotations

import torch


def reference_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
                               causal: bool, scale: float | None = None) -> torch.Tensor:
    """Naive softmax(q k^T * scale) v per segment in float64; keyless segments give zeros.

    Deliberately written without SDPA, masks tricks or batching so that it is obviously right.
    Returns float64 [Tq, Hq, D]; differentiable w.r.t. q, k, v.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64, device=q.device)
    for (q0, q1), (k0, k1) in zip(zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()),
                                  zip(cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist())):
        if q1 == q0 or k1 == k0:
            continue
        qs = q64[q0:q1].transpose(0, 1)                                   # [Hq, Lq, D]
        ks = k64[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)   # [Hq, Lk, D]
        vs = v64[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = out.index_put((torch.arange(q0, q1, device=q.device),),
                            (scores.softmax(-1) @ vs).transpose(0, 1))
    return out
