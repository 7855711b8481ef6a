"""Variable-length (packed) attention with run-time backend choice.

Packed rows concatenate many samples; attention must stay inside each segment. On CUDA the
fused varlen kernels do this natively; on any device the portable path runs SDPA once per
segment, so the cost grows with sum(len^2) rather than (sum len)^2 as a dense block-diagonal
mask would.

The per-segment path needs the segment lengths as Python ints. Callers that know them on the host
(the packer does) pass `seqlens_q` / `seqlens_k`, so no call reads `cu_seqlens` back from the
device: on CUDA that read is a host sync per layer, which stalls the launch queue.

The per-segment path dispatches one SDPA (and its views, transposes and backward) per segment per
layer: most of the aten ops of a packed row. A `MaskedPlan` built ONCE per batch replaces that
loop by ONE masked SDPA per call, shared by every layer of the forward:
  causal_rows_plan  self-attention: the segments are packed (first-fit decreasing) into rows as
                    wide as the longest segment; mask [R, 1, W, W] is causal inside each segment,
                    so the cost is R x W^2 instead of a dense row's T^2 (a 4096-token row of
                    ~300-token samples: ~7 rows of the longest sample instead of one 4096^2).
  segment_mask_plan cross-attention: one row, query token t may attend key s iff their segment ids
                    agree; queries of id -1 get exact zeros.
The mask is bool (one byte per element) plus its additive form in the activations' dtype (4 bytes
in fp32); a plan is refused (None: callers keep the per-segment path) above `MAX_MASK_ELEMENTS`
(16 Mi elements, 80 MiB with the fp32 copy: a single 4096-token sample; 0 turns plans off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


def _cuda_ready() -> bool:
    """Whether CUDA kernels can run in this process (tests/test_fake_cuda.py answers yes for fake
    CUDA tensors on a machine without a GPU: a global `torch.cuda.is_available` patch would make
    FakeTensorMode itself initialise CUDA)."""
    return torch.cuda.is_available()


def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable on `device`, fastest first (dtype limits are checked per call).

    `meta` stands for a CUDA card: the fused kernels' meta functions give their output shapes and
    saved tensors, so a meta forward + backward measures what the card would hold (memory plan)."""
    device = torch.device(device)
    found: list[str] = []
    if device.type == "meta" or (device.type == "cuda" and _cuda_ready()):
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


MAX_MASK_ELEMENTS = 1 << 24  # 16 Mi mask elements per plan (a 4096-token sample); beyond: per segment


@dataclass(frozen=True)
class MaskedPlan:
    """One masked SDPA for all segments of a packed call (see the module docstring).

    Queries (keys) are laid out in R rows of Wq (Wk) slots: slot j of the flattened rows holds
    token `gather_q[j]` (`gather_k[j]`); None means the tokens themselves, in order (R = 1).
    `mask` [R, 1, Wq, Wk] says which key slot a query slot attends; every query row attends at
    least one slot (padding attends padding), so no softmax row is empty and every value stays
    finite. `scatter_q` [Tq] is each query token's slot (None: identity); `keyless` [Tq] marks the
    query tokens whose segment has no key: their output is set to exact zeros.
    Padding slots only ever meet padding: their outputs are dropped, so their gradients are exact
    zeros and the result equals the per-segment one up to rounding.
    The additive form of the mask (0 / -inf in the activations' dtype, what SDPA turns a bool mask
    into on every call) is made once per dtype and kept, so the layers share it too.
    """

    mask: torch.Tensor
    gather_q: torch.Tensor | None = None
    gather_k: torch.Tensor | None = None
    scatter_q: torch.Tensor | None = None
    keyless: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._additive:
            zero = torch.zeros((), dtype=dtype, device=self.mask.device)
            self._additive[dtype] = zero.masked_fill(~self.mask, float("-inf"))
        return self._additive[dtype]

    def to(self, device: torch.device | str) -> "MaskedPlan":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MaskedPlan(*(move(t) for t in (self.mask, self.gather_q, self.gather_k,
                                              self.scatter_q, self.keyless)))


def causal_rows_plan(seqlens: Sequence[int], device: torch.device | str = "cpu",
                     max_mask_elements: int | None = None) -> MaskedPlan | None:
    """Plan of causal self-attention inside each segment of host lengths `seqlens`; None when
    the mask would exceed `max_mask_elements` (default: `MAX_MASK_ELEMENTS`, read at call time;
    0 turns plans off) or there is no token.

    Built from host ints only (the packer's lengths): index tensors and a [R, W] segment / position
    grid are made on the host and copied over in one (pinned on CUDA, so asynchronous) copy; the
    mask is compared out on `device`."""
    lens = [int(n) for n in seqlens]
    width = max(lens, default=0)
    if width == 0:
        return None
    rows: list[list[int]] = []  # segment numbers per row, first-fit decreasing
    room: list[int] = []
    for seg in sorted((i for i, n in enumerate(lens) if n), key=lambda i: -lens[i]):
        for r, free in enumerate(room):
            if free >= lens[seg]:
                rows[r].append(seg)
                room[r] -= lens[seg]
                break
        else:
            rows.append([seg])
            room.append(width - lens[seg])
    limit = MAX_MASK_ELEMENTS if max_mask_elements is None else max_mask_elements
    if len(rows) * width * width > limit:
        return None
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    gather, seg_id, pos = [], [], []
    scatter = [0] * starts[-1]
    for r, members in enumerate(rows):
        slot = r * width
        for seg in members:
            for t in range(starts[seg], starts[seg + 1]):
                scatter[t] = slot
                slot += 1
            gather.extend(range(starts[seg], starts[seg + 1]))
            seg_id.extend([seg] * lens[seg])
            pos.extend(range(lens[seg]))
        pad = (r + 1) * width - slot  # padding: its own segment (-1), causal among itself
        gather.extend([0] * pad)
        seg_id.extend([-1] * pad)
        pos.extend(range(pad))
    host = torch.tensor(seg_id + pos + gather + scatter, dtype=torch.long)
    device = torch.device(device)
    if device.type == "cuda":  # a copy from pageable memory would wait for the stream: pin it
        host = host.pin_memory()
    values = host.to(device, non_blocking=True)
    grid = values[: 2 * len(seg_id)].view(2, len(rows), width)
    seg_grid, pos_grid = grid[0], grid[1]
    mask = (seg_grid[:, :, None] == seg_grid[:, None, :]) & (pos_grid[:, None, :] <= pos_grid[:, :, None])
    gather_index, scatter_index = values[2 * len(seg_id):].split([len(gather), len(scatter)])
    return MaskedPlan(mask=mask[:, None], gather_q=gather_index, gather_k=gather_index,
                      scatter_q=scatter_index)


def segment_mask_plan(segment_q: torch.Tensor, segment_k: torch.Tensor) -> MaskedPlan:
    """Plan of non-causal attention of query token t to key s iff `segment_q[t] == segment_k[s]`
    (device tensors; no host read). Queries of segment -1 are keyless (exact zeros); every other
    query id must be some key's. One row of Tq x Tk elements: the caller checks the size."""
    keyless = segment_q < 0
    mask = (segment_q[:, None] == segment_k[None, :]) | keyless[:, None]
    return MaskedPlan(mask=mask[None, None], keyless=keyless)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: MaskedPlan,
                     scale: float | None = None, heads_first: bool = False) -> torch.Tensor:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] (GQA when Hq > Hkv) attended as `plan` says, in ONE SDPA;
    returns [Tq, Hq, D]. `heads_first`: q/k/v come as [1, H, T, D] (transformers' layout; no
    transpose each way) and the result is [1, Tq, Hq, D], what a transformers attention
    function returns."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = plan.rows
    token_dim = 2 if heads_first else 0

    def grid(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:  # -> [R, H, W, D]
        if index is not None:
            t = t.index_select(token_dim, index)
        if heads_first:
            return t.view(t.shape[1], rows, -1, t.shape[-1]).transpose(0, 1)
        return t.view(rows, -1, *t.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(grid(q, plan.gather_q), grid(k, plan.gather_k),
                                         grid(v, plan.gather_k), attn_mask=plan.additive_mask(q.dtype),
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[-1])  # [R * Wq, H, D]
    if plan.scatter_q is not None:
        out = out.index_select(0, plan.scatter_q)
    if plan.keyless is not None:
        out = out.masked_fill(plan.keyless[:, None, None], 0)
    return out.unsqueeze(0) if heads_first else out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool,
                     scale: float | None = None, backend: str = "auto",
                     seqlens_q: Sequence[int] | None = None,
                     seqlens_k: Sequence[int] | None = None,
                     plan: MaskedPlan | None = None) -> torch.Tensor:
    """Attention of q segment i (q[cu_q[i]:cu_q[i+1]]) to k/v segment i only.

    q [Tq, Hq, D], k/v [Tk, Hkv, D] with Hq a multiple of Hkv; cu_seqlens_* int32 [N+1].
    causal=True is self-attention (equal q/k segments, lower-triangular inside each).
    A segment with zero keys yields exact zeros. Returns [Tq, Hq, D] in q's dtype.
    `seqlens_q/k` are the same segment lengths as host ints (the differences of cu_seqlens_*);
    the sdpa backend then never reads cu_seqlens back. Without them it does (a sync on CUDA).
    `plan` (the same segments as a `MaskedPlan`, built once per batch) makes the sdpa backend run
    one masked SDPA instead of one per segment; fused backends ignore it.
    """
    _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chosen = resolve_backend(backend, q)
    if chosen != "sdpa":
        return _fused(chosen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, scale)
    if plan is not None:
        return masked_attention(q, k, v, plan, scale)
    lens_q = _segment_lengths(seqlens_q, cu_seqlens_q, q.shape[0], "seqlens_q", exact=True)
    lens_k = _segment_lengths(seqlens_k, cu_seqlens_k, k.shape[0], "seqlens_k", exact=False)
    return _sdpa(q, k, v, lens_q, lens_k, causal, scale)
