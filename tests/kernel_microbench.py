"""Micro benchmark: packed varlen attention per backend vs one sample per call.

Answers "does packing ever lose on this device?" for attention alone: a packed call must cost
about the sum of the per-sample calls (sum of len^2), never the dense (sum of len)^2.
"""
from __future__ import annotations

import time
from itertools import accumulate
from statistics import median

import torch

from mmgpt_kernels.varlen import usable_backends, varlen_attention


def _seconds(step, device: torch.device, repeats: int) -> float:
    """Median wall time of `step` after one warm-up, synchronising CUDA around each run."""
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return median(timed() for _ in range(repeats))


def time_backends(lengths: list[int], heads: int = 16, head_dim: int = 64, *,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  causal: bool = True, backward: bool = True,
                  repeats: int = 3) -> dict[str, float]:
    """Seconds per forward(+backward) of causal self-attention over `lengths` packed in one row.

    Keys: every backend usable for these tensors, plus "per_sample" (one call per sample, the
    seed trainer's batch-1 loop) as the baseline the packed path must not lose to.
    """
    device = torch.device(device)
    cu = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, device=device, dtype=dtype,
                           requires_grad=backward) for _ in range(3))

    def run(backend: str, cu_part: torch.Tensor, *qkv: torch.Tensor) -> None:
        longest = int((cu_part[1:] - cu_part[:-1]).max())
        out = varlen_attention(*qkv, cu_part, cu_part, longest, longest, causal=causal,
                               backend=backend)
        if backward:
            out.sum().backward()

    def per_sample() -> None:
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            one = torch.tensor([0, end - start], dtype=torch.int32, device=device)
            run("auto", one, *(t[start:end] for t in (q, k, v)))

    results = {b: _seconds(lambda b=b: run(b, cu, q, k, v), device, repeats)
               for b in usable_backends(q)}
    results["per_sample"] = _seconds(per_sample, device, repeats)
    return results
