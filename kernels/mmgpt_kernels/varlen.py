"""Variable-length (packed) attention with run-time backend choice.

Packed rows concatenate many samples; attention must stay inside each segment. On CUDA the
fused varlen kernels do this natively; on any device the portable path runs SDPA once per
segment, so the cost grows with sum(len^2) rather than (sum len)^2 as a dense block-diagonal
mask would.

The per-segment path needs the segment lengths as Python ints. Callers that know them on the host
(the packer does) pass `seqlens_q` / `seqlens_k`, so no call reads `cu_seqlens` back from the
device: on CUDA that read is a host sync per layer, which stalls the launch queue.
"""
from __future__ import annotations

from functools import cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

BACKENDS: tuple[str, ...] = ("flash_attn", "torch_varlen", "sdpa")

# Fused CUDA kernels only implement half precision and head dims up to 256 (multiple of 8). Below
# 32 we keep SDPA: torch's varlen backward failed (cudaErrorInvalidValue) at head dim 16 on an H200.
_FUSED_DTYPES = (torch.float16, torch.bfloat16)
_FUSED_MIN_HEAD_DIM = 32
_FUSED_MAX_HEAD_DIM = 256


@cache
def _flash_attn_func() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # also raised when the wheel was built for another torch
        return None
    return flash_attn_varlen_func


@cache
def _torch_varlen_func() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable on `device`, fastest first (dtype limits are checked per call)."""
    device = torch.device(device)
    found: list[str] = []
    if device.type == "cuda" and torch.cuda.is_available():
        if _flash_attn_func() is not None:
            found.append("flash_attn")
        if _torch_varlen_func() is not None:
            found.append("torch_varlen")
    found.append("sdpa")
    return found


def _unsupported_reason(backend: str, q: torch.Tensor) -> str | None:
    """Why `backend` cannot run on these tensors, or None when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"
    if backend == "sdpa":
        return None
    if backend not in available_backends(q.device):
        need = "flash-attn installed" if backend == "flash_attn" else "torch.nn.attention.varlen"
        return f"backend {backend!r} needs CUDA tensors and {need}; got device {q.device}"
    if q.dtype not in _FUSED_DTYPES:
        return f"backend {backend!r} needs float16/bfloat16 tensors; got {q.dtype}"
    head_dim = q.shape[-1]
    if not _FUSED_MIN_HEAD_DIM <= head_dim <= _FUSED_MAX_HEAD_DIM or head_dim % 8:
        return (f"backend {backend!r} needs a head dim in [{_FUSED_MIN_HEAD_DIM}, "
                f"{_FUSED_MAX_HEAD_DIM}], a multiple of 8; got {head_dim}")
    return None


def usable_backends(q: torch.Tensor) -> list[str]:
    """Backends that can run on tensors like `q` (device, dtype, head dim), fastest first."""
    return [b for b in available_backends(q.device) if _unsupported_reason(b, q) is None]


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend that will run: `auto` picks the fastest usable one; an explicit one must fit."""
    if backend == "auto":
        return usable_backends(q)[0]
    reason = _unsupported_reason(backend, q)
    if reason is not None:
        raise ValueError(f"varlen_attention: {reason}")
    return backend


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention: q/k/v must be [T, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"varlen_attention: k/v shapes {tuple(k.shape)}, {tuple(v.shape)} do "
                         f"not match each other or q's head dim {q.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: query heads ({q.shape[1]}) must be a multiple of "
                         f"key/value heads ({k.shape[1]})")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError(f"varlen_attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and "
                         f"cu_seqlens_k {tuple(cu_seqlens_k.shape)} must both be [N+1]")


def _segment_lengths(host: Sequence[int] | None, cu: torch.Tensor, total: int, name: str,
                     exact: bool) -> list[int]:
    """Per-segment lengths: the caller's host lengths, else read from `cu` (a host sync on CUDA),
    validated against the segment and token counts."""
    if host is None:
        bounds = cu.tolist()
        if bounds[0] != 0:
            raise ValueError(f"varlen_attention: cu_{name} must start at 0; got {bounds}")
        host = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    lens = list(host)
    if len(lens) != cu.numel() - 1:
        raise ValueError(f"varlen_attention: {len(lens)} {name} for {cu.numel() - 1} segments")
    if any(n < 0 for n in lens):
        raise ValueError(f"varlen_attention: {name} must be non-negative (cu_{name} "
                         f"non-decreasing); got {lens}")
    end = sum(lens)
    if end > total or (exact and end != total):
        raise ValueError(f"varlen_attention: cu_{name} ends at {end} but there are {total} tokens")
    return lens


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens_q: list[int],
          lens_k: list[int], causal: bool, scale: float) -> torch.Tensor:
    """One SDPA call per segment of host lengths; zero-key segments get exact zeros."""
    if causal and lens_q != lens_k:
        raise ValueError("varlen_attention: causal=True is self-attention and needs equal q and "
                         f"k segments; got q lengths {lens_q} and k lengths {lens_k}")
    gqa = q.shape[1] != k.shape[1]
    tail_k = [k.shape[0] - sum(lens_k)]  # keys past the last segment are never attended
    # split (not slicing) keeps the backward a single concatenation instead of one pass per
    # segment. [L, H, D] -> [1, H, L, D] is a free view in the token-major layout that the CPU
    # flash kernel uses, and its output transposed back is a contiguous [L, H, D] block.
    outs: list[torch.Tensor] = []
    for qi, ki, vi, lq, lk in zip(q.split(lens_q), k.split(lens_k + tail_k),
                                  v.split(lens_k + tail_k), lens_q, lens_k):
        if lq == 0:
            continue
        if lk == 0:
            outs.append(qi.new_zeros(qi.shape))
            continue
        heads_first = (t.unsqueeze(0).transpose(1, 2) for t in (qi, ki, vi))
        out = F.scaled_dot_product_attention(*heads_first, is_causal=causal, scale=scale,
                                             enable_gqa=gqa)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _zero_keyless(out: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """Force exact zeros for query tokens whose segment has no keys, without a host sync."""
    keyless = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]) == 0
    per_token = torch.repeat_interleave(keyless, cu_seqlens_q[1:] - cu_seqlens_q[:-1],
                                        output_size=out.shape[0])
    return out.masked_fill(per_token[:, None, None], 0)


def _fused(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
           max_seqlen_k: int, causal: bool, scale: float) -> torch.Tensor:
    """CUDA varlen kernels; GQA is native in both. Keyless cross-attention segments are zeroed
    afterwards (causal self-attention has none: its q and k segments are equal)."""
    cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    if backend == "flash_attn":
        out = _flash_attn_func()(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale=scale, causal=causal)
    else:
        # enable_gqa only when needed: older torch releases (2.11) lack the keyword.
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        out = _torch_varlen_func()(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale=scale,
                                   window_size=(-1, 0) if causal else (-1, -1), **gqa)
    return out if causal else _zero_keyless(out, cu_q, cu_k)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool,
                     scale: float | None = None, backend: str = "auto",
                     seqlens_q: Sequence[int] | None = None,
                     seqlens_k: Sequence[int] | None = None) -> torch.Tensor:
    """Attention of q segment i (q[cu_q[i]:cu_q[i+1]]) to k/v segment i only.

    q [Tq, Hq, D], k/v [Tk, Hkv, D] with Hq a multiple of Hkv; cu_seqlens_* int32 [N+1].
    causal=True is self-attention (equal q/k segments, lower-triangular inside each).
    A segment with zero keys yields exact zeros. Returns [Tq, Hq, D] in q's dtype.
    `seqlens_q/k` are the same segment lengths as host ints (the differences of cu_seqlens_*);
    the sdpa backend then never reads cu_seqlens back. Without them it does (a sync on CUDA).
    """
    _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chosen = resolve_backend(backend, q)
    if chosen != "sdpa":
        return _fused(chosen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, scale)
    lens_q = _segment_lengths(seqlens_q, cu_seqlens_q, q.shape[0], "seqlens_q", exact=True)
    lens_k = _segment_lengths(seqlens_k, cu_seqlens_k, k.shape[0], "seqlens_k", exact=False)
    return _sdpa(q, k, v, lens_q, lens_k, causal, scale)
