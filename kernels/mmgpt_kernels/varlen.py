"""Variable-length (packed) attention with run-time backend choice.

Packed rows concatenate many samples; attention must stay inside each segment. On CUDA the
fused varlen kernels do this natively; on any device the portable path runs SDPA once per
segment, so the cost grows with sum(len^2) rather than (sum len)^2 as a dense block-diagonal
mask would.

The per-segment path needs the segment lengths as Python ints. Callers that know them on the host
(the packer does) pass `seqlens_q` / `seqlens_k`, so no call reads `cu_seqlens` back from the
device: on CUDA that read is a host sync per layer, which stalls the launch queue.

The per-segment path dispatches one SDPA (and its views, transposes and backward) per segment per
layer: most of the aten ops of a packed row. A `RowsPlan` built ONCE per batch replaces that loop
by a few batched SDPA calls, shared by every layer of the forward. Each segment becomes one row
starting at slot 0, padded to its group's width; segments of similar length share a group, and a
group is ONE SDPA with no mask at all:
  causal_rows_plan  self-attention: `is_causal` per row (a segment's queries never reach the
                    padding after it), so the kernels skip the blocks above the diagonal;
  key_rows_plan     cross-attention: row r attends exactly its key block (its image's latents).
Why not one masked call: a mask costs its full W x W (the kernels cannot skip masked blocks) and a
row of many short samples wastes most of it: one masked SDPA over rows of the longest sample made
the CPU packing benchmark slower than batch-1 (issue 23). The groups come from a dynamic
programme over the sorted lengths that trades padded work against `SDPA_CALL_COST` per call, so
rows of like lengths take one call and a row of one long and many short samples takes two.
"""
from __future__ import annotations

from dataclasses import dataclass
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


# Fixed cost of one more SDPA call in a plan (its gathers, views, kernel set-up and backward), in
# query-key pairs times the head width (heads x head dim), which a pair's work scales with. Set on
# the CPU (2 threads, a 4096-token row of the small preset's 16 x 64 heads, fwd + bwd): 16 Ki
# pairs at width 1024 gave 4 calls and beat both 8 calls and 1; the plan builders trade it
# against the padding a wider group adds.
SDPA_CALL_COST = 1 << 24
ROW_PLANS = True  # False: callers get no plan and keep the per-segment path (`mmgpt bench ops --compare`)


@dataclass(frozen=True)
class RowGroup:
    """`gather_q.numel() // width` rows of `width` query slots, one segment per row from slot 0,
    the rest padding (token 0). `key_rows` [rows]: the block of keys each row attends
    (cross-attention); None: the row's own slots, causally (self-attention)."""

    gather_q: torch.Tensor
    key_rows: torch.Tensor | None
    width: int


@dataclass(frozen=True)
class RowsPlan:
    """Packed attention as a few batched SDPA calls without any mask (module docstring).

    Every segment is one row of a group; a group is [rows, width] and runs as ONE SDPA: causal
    rows need no mask (a segment starts at slot 0, so its queries never reach the padding after
    it) and cross-attention rows attend exactly their key block. The padding slots' outputs are
    dropped, so their gradients are exact zeros and the result equals the per-segment one up to
    rounding. `scatter_q` [Tq]: each query token's slot in the groups' concatenated outputs;
    `keyless` [Tq] (None: none) marks tokens whose segment has no key: exact zeros.
    """

    groups: tuple[RowGroup, ...]
    causal: bool
    scatter_q: torch.Tensor
    keyless: torch.Tensor | None = None
    key_block: int = 0  # keys per block of `key_rows` (cross-attention)

    @property
    def calls(self) -> int:
        return len(self.groups)


def _group_by_length(lens: Sequence[int], keys_per_query: Callable[[int], float],
                     call_cost: float) -> list[list[int]]:
    """Segment numbers (of the non-empty `lens`) in groups of similar length that minimise
    sum(rows x width x keys_per_query(width)) + call_cost x groups.

    Optimal groups are contiguous in length order; the dynamic programme runs over the distinct
    lengths, at most sqrt(2 x tokens) of them (~90 for a 4096-token row), on host ints."""
    order = sorted((i for i, n in enumerate(lens) if n), key=lambda i: lens[i])
    widths = sorted({lens[i] for i in order})
    count = [0]  # segments no longer than widths[j - 1]
    for w in widths:
        count.append(count[-1] + sum(1 for i in order if lens[i] == w))
    best, cut = [0.0], [0]
    for j, w in enumerate(widths, 1):
        per_row = w * keys_per_query(w)
        costs = [best[i] + (count[j] - count[i]) * per_row + call_cost for i in range(j)]
        cut.append(min(range(j), key=costs.__getitem__))
        best.append(costs[cut[-1]])
    groups, j = [], len(widths)
    while j:
        groups.append(order[count[cut[j]]: count[j]])
        j = cut[j]
    return groups[::-1]


def _rows_plan(lens: list[int], keyed: list[bool], causal: bool, key_rows: torch.Tensor | None,
               key_block: int, head_width: int, device: torch.device | str) -> RowsPlan | None:
    """The plan of segments of host lengths `lens` (see `causal_rows_plan`, `key_rows_plan`)."""
    total = sum(lens)
    if not ROW_PLANS or total == 0:
        return None
    keys = (lambda w: w / 2) if causal else (lambda w: key_block)  # noqa: E731
    groups = _group_by_length([n if k else 0 for n, k in zip(lens, keyed)], keys,
                              SDPA_CALL_COST / head_width)
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    ordinal = [sum(keyed[:i]) for i in range(len(lens))]  # segment -> its key block's position
    gather, scatter, widths, rows_of = [], [0] * total, [], []
    for members in groups:
        width = max(lens[s] for s in members)
        for s in members:
            scatter[starts[s]: starts[s + 1]] = range(len(gather), len(gather) + lens[s])
            gather.extend(range(starts[s], starts[s + 1]))
            gather.extend([0] * (width - lens[s]))
        widths.append(width)
        rows_of.append([ordinal[s] for s in members])
    dead = [not keyed[s] for s, n in enumerate(lens) for _ in range(n)]
    host = torch.tensor(gather + scatter + [i for r in rows_of for i in r] + dead, dtype=torch.long)
    device = torch.device(device)
    if device.type == "cuda":  # a copy from pageable memory would wait for the stream: pin it
        host = host.pin_memory()
    values = host.to(device, non_blocking=True)
    gather_t, scatter_t, rows_t, dead_t = values.split([len(gather), total, len(host) - len(gather)
                                                        - 2 * total, total])
    out = []
    for g, r in zip(gather_t.split([len(m) * w for m, w in zip(groups, widths)]),
                    rows_t.split([len(m) for m in groups])):
        out.append(RowGroup(g, None if causal else key_rows.index_select(0, r), widths[len(out)]))
    return RowsPlan(tuple(out), causal, scatter_t, None if all(keyed) else dead_t.bool(), key_block)


def causal_rows_plan(seqlens: Sequence[int], head_width: int, device: torch.device | str = "cpu"
                     ) -> RowsPlan | None:
    """Plan of causal self-attention inside each segment of host lengths `seqlens` (tensors of
    `head_width` = heads x head dim); None without a token or when `ROW_PLANS` is off.

    Built from host ints only (the packer's lengths): the index tensors are made on the host and
    copied over in one (pinned on CUDA, so asynchronous) copy."""
    lens = [int(n) for n in seqlens]
    return _rows_plan(lens, [True] * len(lens), True, None, 0, head_width, device)


def key_rows_plan(seqlens_q: Sequence[int], key_rows: torch.Tensor, key_block: int,
                  keyed: Sequence[bool], head_width: int) -> RowsPlan | None:
    """Plan of non-causal attention of query segment i (host lengths `seqlens_q`) to ONE block of
    `key_block` keys: block `key_rows[j]` for the j-th segment with `keyed[i]` (a device tensor,
    one entry per keyed segment: no host read); unkeyed segments get exact zeros."""
    lens = [int(n) for n in seqlens_q]
    return _rows_plan(lens, [bool(k) for k in keyed], False, key_rows, key_block, head_width,
                      key_rows.device)


def rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RowsPlan,
                   scale: float | None = None, heads_first: bool = False) -> torch.Tensor:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] (GQA when Hq > Hkv) attended as `plan` says, one SDPA per
    group; returns [Tq, Hq, D]. `heads_first` (self-attention only): q/k/v come as [1, H, T, D]
    (transformers' layout; no transpose each way) and the result is [1, Tq, Hq, D], what a
    transformers attention function returns. Cross-attention keys are the `key_block`-key blocks
    of k/v, in order."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    token_dim = 2 if heads_first else 0
    gqa = q.shape[1] != k.shape[1]  # heads are dim 1 in both layouts

    def grid(t: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:  # -> [R, H, W, D]
        t = t.index_select(token_dim, index)
        if heads_first:
            return t.view(t.shape[1], -1, width, t.shape[-1]).transpose(0, 1)
        return t.view(-1, width, *t.shape[1:]).transpose(1, 2)

    def keys(t: torch.Tensor, group: RowGroup) -> torch.Tensor:
        if plan.causal:
            return grid(t, group.gather_q, group.width)
        blocks = t.view(-1, plan.key_block, *t.shape[1:])  # [blocks, key_block, H, D]
        return blocks.index_select(0, group.key_rows).transpose(1, 2)

    outs = []
    for group in plan.groups:
        out = F.scaled_dot_product_attention(grid(q, group.gather_q, group.width), keys(k, group),
                                             keys(v, group), is_causal=plan.causal, scale=scale,
                                             enable_gqa=gqa)
        outs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[-1]))  # [R * W, H, D]
    out = (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, plan.scatter_q)
    if plan.keyless is not None:
        out = out.masked_fill(plan.keyless[:, None, None], 0)
    return out.unsqueeze(0) if heads_first else out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool,
                     scale: float | None = None, backend: str = "auto",
                     seqlens_q: Sequence[int] | None = None,
                     seqlens_k: Sequence[int] | None = None,
                     plan: RowsPlan | None = None) -> torch.Tensor:
    """Attention of q segment i (q[cu_q[i]:cu_q[i+1]]) to k/v segment i only.

    q [Tq, Hq, D], k/v [Tk, Hkv, D] with Hq a multiple of Hkv; cu_seqlens_* int32 [N+1].
    causal=True is self-attention (equal q/k segments, lower-triangular inside each).
    A segment with zero keys yields exact zeros. Returns [Tq, Hq, D] in q's dtype.
    `seqlens_q/k` are the same segment lengths as host ints (the differences of cu_seqlens_*);
    the sdpa backend then never reads cu_seqlens back. Without them it does (a sync on CUDA).
    `plan` (the same segments as a `RowsPlan`, built once per batch) makes the sdpa backend run
    a few batched SDPA calls instead of one per segment; fused backends ignore it.
    """
    _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chosen = resolve_backend(backend, q)
    if chosen != "sdpa":
        return _fused(chosen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, scale)
    if plan is not None:
        return rows_attention(q, k, v, plan, scale)
    lens_q = _segment_lengths(seqlens_q, cu_seqlens_q, q.shape[0], "seqlens_q", exact=True)
    lens_k = _segment_lengths(seqlens_k, cu_seqlens_k, k.shape[0], "seqlens_k", exact=False)
    return _sdpa(q, k, v, lens_q, lens_k, causal, scale)
