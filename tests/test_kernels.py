"""mmgpt_kernels.varlen_attention: every backend on this machine vs a float64 reference."""
from __future__ import annotations

from itertools import accumulate
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmgpt_kernels import (BACKENDS, available_backends, causal_rows_plan, key_rows_plan,
                           resolve_backend, rows_attention, usable_backends, varlen, varlen_attention)
from kernel_microbench import time_backends
from kernel_reference import reference_varlen_attention

CUDA = torch.device("cuda") if torch.cuda.is_available() else None
HEAD_DIM = 32  # the smallest head dim the fused CUDA backends accept

# (forward atol, gradient atol) against float64; rtol equals atol.
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
             torch.float16: (5e-3, 1e-2), torch.bfloat16: (2e-2, 4e-2)}


def _device_for(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "sdpa" else (CUDA or torch.device("cpu"))


def _skip_unless_available(backend: str) -> torch.device:
    device = _device_for(backend)
    if backend not in available_backends(device):
        pytest.skip(f"needs CUDA: backend {backend!r} and its kernel are not available here")
    return device


def _cases() -> list[tuple[str, torch.dtype]]:
    """sdpa in every dtype; fused CUDA kernels only in half precision."""
    return ([("sdpa", d) for d in (torch.float64, torch.float32, torch.bfloat16)]
            + [(b, d) for b in ("flash_attn", "torch_varlen")
               for d in (torch.bfloat16, torch.float16)])


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)


def _inputs(lens_q: list[int], lens_k: list[int], hq: int, hkv: int, dim: int,
            dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens_k), hkv, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), hkv, dim, generator=gen, dtype=torch.float64)
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device)


SCENARIOS = {
    # name: (lens_q, lens_k, causal, Hq, Hkv)
    "self_causal_mixed": ([7, 1, 12, 3], [7, 1, 12, 3], True, 4, 4),
    "self_causal_gqa": ([5, 16, 9], [5, 16, 9], True, 8, 2),
    "self_noncausal": ([6, 11, 2], [6, 11, 2], False, 4, 4),
    "cross_gqa": ([3, 9, 4, 1], [8, 8, 16, 8], False, 4, 2),
    "cross_zero_keys": ([4, 6, 5, 2], [0, 8, 0, 8], False, 4, 4),
    "zero_len_q": ([0, 5, 0, 7, 0], [8, 8, 8, 8, 0], False, 4, 1),
    "self_causal_zero_len": ([4, 0, 6, 0], [4, 0, 6, 0], True, 2, 2),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("backend,dtype", _cases())
def test_matches_float64_reference(backend: str, dtype: torch.dtype, scenario: str) -> None:
    device = _skip_unless_available(backend)
    lens_q, lens_k, causal, hq, hkv = SCENARIOS[scenario]
    dim = HEAD_DIM
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, hq, hkv, dim, dtype, device)
    scale = 0.3  # non-default, so a backend that ignores `scale` fails
    out = varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                           scale=scale, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_varlen_attention(*leaves, cu_q, cu_k, causal=causal, scale=scale)
    atol, gtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=atol)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=gtol, rtol=gtol, msg=f"d{name}")


# Cross-attention as the model runs it: query segment i attends ONE block of BLOCK keys (its image's
# latents), blocks named per keyed segment (repeats allowed), None: no keys (exact zeros).
BLOCK = 8
CROSS_SCENARIOS = {
    # name: (lens_q, key block of each segment, blocks, Hq, Hkv)
    "cross_blocks_gqa": ([3, 9, 4, 1], [2, 0, None, 2], 3, 4, 2),
    "cross_zero_len": ([0, 5, 0, 7, 3], [1, None, 0, None, 1], 2, 4, 1),
}
HEAD_WIDTH = 4 * HEAD_DIM


def _cross_inputs(scenario: str, dtype: torch.dtype):
    """q, key/value blocks (leaves), the plan, and the same attention as plain varlen segments
    (k/v gathered per segment) for the reference."""
    lens_q, rows, blocks, hq, hkv = CROSS_SCENARIOS[scenario]
    q, k, v, cu_q, _ = _inputs(lens_q, [blocks * BLOCK], hq, hkv, HEAD_DIM, dtype, torch.device("cpu"))
    keyed = [r for r in rows if r is not None]
    plan = key_rows_plan(lens_q, torch.tensor(keyed), BLOCK, [r is not None for r in rows], HEAD_WIDTH)
    cu_k = _cu([0 if r is None else BLOCK for r in rows], q.device)
    index = torch.tensor([r * BLOCK + j for r in keyed for j in range(BLOCK)], dtype=torch.long)
    return q, k, v, plan, cu_q, cu_k, index


@pytest.mark.parametrize("scenario", [n for n, s in SCENARIOS.items() if s[2]] + list(CROSS_SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_row_plan_matches_float64_reference(dtype: torch.dtype, scenario: str) -> None:
    """A few unmasked SDPA calls per attention (the sdpa backend's packed path) == the per-segment
    float64 reference, forward and gradients; causal self-attention and block cross-attention."""
    if scenario in CROSS_SCENARIOS:
        q, k, v, plan, cu_q, cu_k, index = _cross_inputs(scenario, dtype)
    else:
        lens, _, _, hq, hkv = SCENARIOS[scenario]
        q, k, v, cu_q, cu_k = _inputs(lens, lens, hq, hkv, HEAD_DIM, dtype, torch.device("cpu"))
        plan, index = causal_rows_plan(lens, HEAD_WIDTH), torch.arange(k.shape[0])
    out = rows_attention(q, k, v, plan, scale=0.3)
    assert out.dtype == dtype and out.shape == q.shape
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_varlen_attention(leaves[0], leaves[1][index], leaves[2][index], cu_q, cu_k,
                                     causal=plan.causal, scale=0.3)
    atol, gtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=atol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    for name, got, want in zip("qkv", grads, torch.autograd.grad(ref, leaves, grad_out)):
        torch.testing.assert_close(got.double(), want, atol=gtol, rtol=gtol, msg=f"d{name}")


def test_row_plan_keyless_queries_and_padding_are_exact_zeros() -> None:
    q, k, v, plan, *_ = _cross_inputs("cross_blocks_gqa", torch.float32)
    out = rows_attention(q, k, v, plan)
    keyless = torch.arange(12, 16)  # segment 2 (tokens 12..15) has no keys
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless])) and out[:12].abs().sum() > 0
    (grad_q,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(grad_q[keyless], torch.zeros_like(grad_q[keyless]))
    # causal rows: padding slots gather token 0 but never reach a real query
    lens = [9, 2, 3]
    q, k, v, cu, _ = _inputs(lens, lens, 2, 2, HEAD_DIM, torch.float64, torch.device("cpu"))
    out = rows_attention(q, k, v, causal_rows_plan(lens, HEAD_WIDTH))
    grads = torch.autograd.grad(out[9:].sum(), (q, k, v))  # segment 0 (token 0) does not see it
    assert all(torch.equal(g[:9], torch.zeros_like(g[:9])) for g in grads)


def test_causal_rows_plan_groups_segments_of_like_length() -> None:
    lens = [7, 1, 12, 3, 0, 5]
    one = causal_rows_plan(lens, head_width=1)  # calls dear next to this little work: one group
    assert [(g.width, g.gather_q.numel()) for g in one.groups] == [(12, 5 * 12)]
    assert sorted(one.scatter_q.tolist()) == one.scatter_q.unique().tolist()
    # a row of one long and many short samples: a mask (or one group) would spend most of its
    # 600 x 600 per sample on padding; two groups cost 600^2/2 + 40 x 20^2/2 pairs and one call more
    two = causal_rows_plan([20] * 20 + [600] + [20] * 20, head_width=1024)
    assert [(g.width, g.gather_q.numel()) for g in two.groups] == [(20, 40 * 20), (600, 600)]
    many = causal_rows_plan(lens, head_width=1 << 30)  # calls free: a group per distinct length
    assert [g.width for g in many.groups] == [1, 3, 5, 7, 12]
    assert causal_rows_plan([0, 0], HEAD_WIDTH) is None
    saved, varlen.ROW_PLANS = varlen.ROW_PLANS, False
    try:
        assert causal_rows_plan(lens, HEAD_WIDTH) is None  # off: callers keep the per-segment path
    finally:
        varlen.ROW_PLANS = saved


def test_rows_attention_heads_first_equals_token_major() -> None:
    lens = [5, 16, 9]
    q, k, v, cu, _ = _inputs(lens, lens, 8, 2, HEAD_DIM, torch.float64, torch.device("cpu"))
    plan = causal_rows_plan(lens, head_width=1 << 30)  # several groups
    assert plan.calls == 3
    token_major = rows_attention(q, k, v, plan, scale=0.3)
    heads_first = rows_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), plan, scale=0.3,
                                 heads_first=True)
    assert heads_first.shape == (1, *q.shape)
    torch.testing.assert_close(heads_first[0], token_major, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,dtype", _cases())
def test_keyless_segments_are_exact_zeros(backend: str, dtype: torch.dtype) -> None:
    """Text chunks before any image: exact zeros out, exact zeros back to their queries."""
    device = _skip_unless_available(backend)
    lens_q, lens_k = [3, 5, 4], [0, 8, 0]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 4, 4, HEAD_DIM, dtype, device)
    out = varlen_attention(q, k, v, cu_q, cu_k, 5, 8, causal=False, backend=backend)
    keyless = torch.cat([torch.arange(0, 3), torch.arange(8, 12)]).to(device)
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless]))
    assert out[3:8].abs().sum() > 0
    (grad_q,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(grad_q[keyless], torch.zeros_like(grad_q[keyless]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,dtype", _cases())
def test_single_segment_equals_plain_sdpa(backend: str, dtype: torch.dtype, causal: bool) -> None:
    device = _skip_unless_available(backend)
    q, k, v, cu_q, cu_k = _inputs([19], [19], 4, 4, HEAD_DIM, dtype, device)
    out = varlen_attention(q, k, v, cu_q, cu_k, 19, 19, causal=causal, backend=backend)
    plain = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)),
                                           is_causal=causal).transpose(0, 1)
    atol = 1e-6 if dtype in (torch.float32, torch.float64) else TOLERANCE[dtype][0]
    torch.testing.assert_close(out, plain, atol=atol, rtol=atol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,dtype", _cases())
def test_no_leakage_between_segments(backend: str, dtype: torch.dtype, causal: bool) -> None:
    """Changing one segment's keys/values changes no other segment's output."""
    device = _skip_unless_available(backend)
    lens = [6, 9, 4, 7]
    q, k, v, cu_q, cu_k = _inputs(lens, lens, 4, 2, HEAD_DIM, dtype, device)
    before = varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal=causal, backend=backend)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[6:15] += 3.0
    v2[6:15] -= 5.0
    after = varlen_attention(q, k2, v2, cu_q, cu_k, 9, 9, causal=causal, backend=backend)
    assert not torch.equal(before[6:15], after[6:15])
    assert torch.equal(before[:6], after[:6]) and torch.equal(before[15:], after[15:])


@pytest.mark.parametrize("backend,dtype", _cases())
def test_keys_past_the_last_segment_are_ignored(backend: str, dtype: torch.dtype) -> None:
    device = _skip_unless_available(backend)
    lens_q, lens_k = [5, 3], [8, 8]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k + [6], 4, 4, HEAD_DIM, dtype, device)
    cu_k = cu_k[:-1]  # 6 trailing keys belong to no segment
    before = varlen_attention(q, k, v, cu_q, cu_k, 5, 8, causal=False, backend=backend)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[16:], v2[16:] = k2[16:] * 7.0, v2[16:] + 9.0
    after = varlen_attention(q, k2, v2, cu_q, cu_k, 5, 8, causal=False, backend=backend)
    assert torch.equal(before, after)
    (grad_k,) = torch.autograd.grad(before.sum(), (k,))
    assert torch.equal(grad_k[16:], torch.zeros_like(grad_k[16:]))


@pytest.mark.parametrize("backend,dtype", _cases())
def test_causal_hides_later_tokens(backend: str, dtype: torch.dtype) -> None:
    device = _skip_unless_available(backend)
    lens = [8, 10]
    q, k, v, cu_q, cu_k = _inputs(lens, lens, 2, 2, HEAD_DIM, dtype, device)
    before = varlen_attention(q, k, v, cu_q, cu_k, 10, 10, causal=True, backend=backend)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[13], v2[13] = k2[13] + 2.0, v2[13] + 2.0  # token 5 of segment 1
    after = varlen_attention(q, k2, v2, cu_q, cu_k, 10, 10, causal=True, backend=backend)
    assert torch.equal(before[:13], after[:13])
    assert not torch.equal(before[13:], after[13:])


def test_auto_and_explicit_backend_selection() -> None:
    q = torch.zeros(4, 2, 8)
    assert available_backends("cpu") == ["sdpa"]
    assert usable_backends(q) == ["sdpa"]
    assert resolve_backend("auto", q) == "sdpa"
    for name in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match=name):
            resolve_backend(name, q)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("triton", q)
    assert set(BACKENDS) == {"flash_attn", "torch_varlen", "sdpa"}


@pytest.mark.skipif(CUDA is None, reason="needs CUDA: no GPU here")
def test_auto_on_cuda_prefers_fused_in_half_precision() -> None:
    fused = [b for b in available_backends(CUDA) if b != "sdpa"]
    assert resolve_backend("auto", torch.zeros(4, 2, 64, device=CUDA)) == "sdpa"  # fp32: no fused
    half = resolve_backend("auto", torch.zeros(4, 2, 64, device=CUDA, dtype=torch.bfloat16))
    assert half == (fused[0] if fused else "sdpa")


@pytest.mark.parametrize("lens_q,lens_k,causal,match", [
    ([3, 5], [4, 4], True, "equal q and k segments"),        # causal needs self-attention
    ([3, 4], [2, 2], False, "ends at 7 but there are 8"),    # cu_q does not cover q
    ([4, 4], [2, 9], False, "ends at 11 but there are 10"),  # cu_k runs past k
])
def test_bad_segmentation_is_a_clear_error(lens_q, lens_k, causal, match) -> None:
    q = torch.randn(8, 2, 8)
    k = v = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, _cu(lens_q, q.device), _cu(lens_k, q.device), 4, 9,
                         causal=causal, backend="sdpa")


@pytest.mark.parametrize("scenario", ["self_causal_mixed", "cross_zero_keys", "zero_len_q"])
def test_host_lengths_give_the_same_result_without_reading_cu_seqlens(scenario, monkeypatch) -> None:
    """The packer's host lengths replace the per-call device read of cu_seqlens (a CUDA sync)."""
    lens_q, lens_k, causal, hq, hkv = SCENARIOS[scenario]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, hq, hkv, HEAD_DIM, torch.float64, torch.device("cpu"))
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    read = varlen_attention(*args, causal=causal, backend="sdpa")

    def no_reads(self):
        raise AssertionError("cu_seqlens read back to the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_reads)
    host = varlen_attention(*args, causal=causal, backend="sdpa", seqlens_q=lens_q, seqlens_k=lens_k)
    assert torch.equal(host, read)
    grads = torch.autograd.grad(host.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("seqlens_q,seqlens_k,match", [
    ([3, 5], [4], "1 seqlens_k for 2 segments"),            # one length per segment
    ([3, 4], [4, 4], "ends at 7 but there are 8"),          # host q lengths do not cover q
    ([4, 4], [-1, 9], "must be non-negative"),
])
def test_bad_host_lengths_are_a_clear_error(seqlens_q, seqlens_k, match) -> None:
    q = torch.randn(8, 2, 8)
    k = v = torch.randn(10, 2, 8)
    cu = _cu([4, 4], q.device)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, cu, cu, 4, 4, causal=False, backend="sdpa",
                         seqlens_q=seqlens_q, seqlens_k=seqlens_k)


def test_gqa_head_mismatch_is_a_clear_error() -> None:
    q, k = torch.randn(4, 3, 8), torch.randn(4, 2, 8)
    cu = _cu([4], q.device)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        varlen_attention(q, k, k, cu, cu, 4, 4, causal=True)


def test_time_backends_reports_every_usable_backend_and_the_baseline() -> None:
    times = time_backends([5, 9, 3], heads=2, head_dim=8, repeats=1)
    assert set(times) == {"sdpa", "per_sample"}
    assert all(t > 0 for t in times.values())


def test_bare_name_kernels_is_not_ours():
    """transformers probes for a PyPI package named `kernels`: ours must never answer, not even
    from the repository root (on sys.path under pytest), where kernels/ is a plain folder."""
    import importlib.util
    import sys

    from transformers.utils.import_utils import is_kernels_available

    repo = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, repo)
    try:
        spec = importlib.util.find_spec("kernels")
        assert spec is None or spec.origin is None, f"`kernels` resolves to a module: {spec.origin}"
        assert not is_kernels_available()
    finally:
        sys.path.remove(repo)
