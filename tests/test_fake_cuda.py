"""The full 9B packed training step on the CUDA code path, without a GPU (issue 23).

CPU (CI): the real `Flamingo` forward of the 9B preset (ViT-L/14 + perceiver + 32 LLaMA-7B layers
+ 8 gated cross-attention blocks + LoRA), bf16, on a packed 4096-token row with images, traced
under `FakeTensorMode` with every parameter and input on device `cuda`: shapes, dtypes, devices
and the kernels' meta functions run, no memory is used and no arithmetic is done. What would
break on a GPU breaks here: a tensor created on the CPU inside the model (device propagation
error), a host read (`.item()`, `.tolist()` of a device tensor: data-dependent output error), a
dtype mismatch, a kernel called with the wrong arguments. Each attention backend the code can
choose on CUDA is traced: `torch_varlen`, `flash_attn` (absent here: a stand-in with the
documented `flash_attn_varlen_func` signature checks the call and computes it with torch's
varlen kernel) and the portable `sdpa` path with its masked plans.

Backward on fake CUDA is refused by the autograd engine itself: `GraphTask::stash_current_streams`
asks the CUDA hooks `hasPrimaryContext(device)` for every CUDA device the graph touches, which
needs a driver ("hasPrimaryContext expects a valid device index"); disabling autograd's device
threads does not avoid it. The test asserts that refusal (so it notices when torch lifts it) and
traces the backward on the `meta` device instead, where `varlen.available_backends` offers the
fused kernels (their meta functions stand in for the CUDA ones).

liger-kernel: its Triton kernels launch on real device pointers, which fake and meta tensors do
not have, so "liger on" is traced only in the real-GPU test; here the test checks that
`apply_liger` declines and says why.

GPU (`bench/gpu.sh`, or `pytest tests/test_fake_cuda.py` on a machine with CUDA): the same row
through a real random-weight 9B, with `torch_varlen` (and `flash_attn` when installed) against
`sdpa`: losses and LoRA gradients agree within the bf16 tolerances stated below.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from unittest import mock

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensorDeviceMismatchError,
                                          FakeTensorMode)

import mmgpt_kernels.varlen as varlen
from mmgpt.contracts import PackedBatch
from mmgpt.data.packing import Packer, PackingConfig
from mmgpt.data.synthetic import synthetic_samples
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.models.fused import apply_liger
from mmgpt.train.loss import packed_loss
from model_helpers import open_gates, randomize_lora_b

ROW_TOKENS = 4096
BF16 = torch.bfloat16
# Real-GPU tolerances, torch_varlen / flash_attn vs sdpa (bf16 activations, fp32 loss): kernels
# sum in different orders, so each attention output differs by ~bf16 eps (2^-8) and that spreads
# through 32 layers. Loss: relative 2e-2. LoRA grads (all concatenated): relative L2 error 0.1.
LOSS_RTOL = 2e-2
GRAD_RTOL = 0.1


@pytest.fixture(scope="module")
def row() -> PackedBatch:
    """A packed 4096-token row of the benchmark's length mix (several samples, several images),
    as the training packer makes it, on the host."""
    side = preset_image_size("9b")
    image = torch.randn(3, side, side, generator=torch.Generator().manual_seed(0))
    samples = synthetic_samples(200, vocab_size=32003, image_token_id=32001, image=image,
                                max_tokens=ROW_TOKENS)
    rows = Packer(PackingConfig(max_tokens=ROW_TOKENS), 32001, (side, side)).pack(samples)
    batch = next(b for b in rows if b.num_tokens > ROW_TOKENS - 64 and b.num_samples >= 8)
    assert batch.images.shape[0] >= 4 and batch.media_layout is not None
    return batch


def documented_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      dropout_p=0.0, softmax_scale=None, causal=False,
                                      window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                      deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2's `flash_attn_varlen_func` as its docstring documents it (flash_attn_interface.py):
    q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim), nheads % nheads_k == 0, fp16/bf16,
    headdim <= 256; cu_seqlens_* (batch + 1,) int32 on q's device; max_seqlen_* ints. Checks the call,
    then computes it with torch's varlen kernel (the same attention)."""
    assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape and q.shape[2] == k.shape[2]
    assert q.shape[1] % k.shape[1] == 0 and q.shape[2] <= 256 and q.dtype in (torch.float16, BF16)
    assert q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    for cu in (cu_seqlens_q, cu_seqlens_k):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device
    assert cu_seqlens_q.shape == cu_seqlens_k.shape
    assert type(max_seqlen_q) is int and type(max_seqlen_k) is int, "max_seqlen_* must be host ints"
    assert dropout_p == 0.0 and softmax_scale is not None and window_size == (-1, -1)
    documented_flash_attn_varlen_func.calls += 1
    return varlen._torch_varlen_func()(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       scale=softmax_scale, window_size=(-1, 0) if causal else (-1, -1))


documented_flash_attn_varlen_func.calls = 0


@contextmanager
def cuda_kernels_offered():
    """The fused backends are offered although no GPU answers (fake CUDA tensors need none);
    flash_attn is the documented stand-in when the package is absent."""
    flash = varlen._flash_attn_func() or documented_flash_attn_varlen_func
    with mock.patch.object(varlen, "_cuda_ready", return_value=True), \
            mock.patch.object(varlen, "_flash_attn_func", return_value=flash):
        yield


def nine_b(backend: str, checkpointing: bool | int = False) -> nn.Module:
    """The 9B preset with LoRA, built on the meta device (no memory, no weights read)."""
    model = build_model(ModelConfig(preset="9b", attn_backend=backend,
                                     gradient_checkpointing=checkpointing), meta=True).model
    return model


def to_fake_cuda(model: nn.Module, mode: FakeTensorMode) -> None:
    """Every parameter and buffer becomes a bf16 (floating) fake tensor on `cuda`, in place, as
    `build_model(..., device="cuda", dtype=bf16)` would leave them. (Building inside the fake mode
    fails: peft's adapter `.to()` cannot swap fake parameters.)"""
    with mode:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    fake = torch.empty(p.shape, dtype=BF16, device="cuda")
                    module._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, device="cuda",
                                                        dtype=BF16 if b.is_floating_point() else b.dtype)


def fake_batch(batch, mode: FakeTensorMode):
    """The host batch as fake host tensors (what `PackedBatch.to` then moves to fake CUDA)."""
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            value = mode.from_tensor(value)
        elif is_dataclass(value):
            value = fake_batch(value, mode)
        values[f.name] = value
    return type(batch)(**values)


def _host_only_pin(tensor: torch.Tensor) -> torch.Tensor:
    """Pinning is a host-memory property fake tensors do not model (aten._pin_memory is NYI);
    what matters to the CUDA path is that only host tensors are pinned."""
    assert tensor.device.type == "cpu", f"pin_memory() of a {tensor.device} tensor"
    return tensor


def fake_cuda_step(row: PackedBatch, backend: str):
    """Trace the packed loss of `row` on the fake-CUDA 9B; returns (model, loss output)."""
    model = nine_b(backend)
    mode = FakeTensorMode(allow_non_fake_inputs=False)  # a real (host) tensor in an op fails too
    to_fake_cuda(model, mode)
    with cuda_kernels_offered(), mock.patch.object(torch.Tensor, "pin_memory", _host_only_pin), mode:
        batch = fake_batch(row, mode).to("cuda", BF16)
        ran = model.attention_backends(BF16, "cuda")
        out = packed_loss(model, model.lm_head, batch)
    return model, ran, out


@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn", "sdpa"])
def test_9b_packed_forward_traces_on_fake_cuda(row, backend):
    documented_flash_attn_varlen_func.calls = 0
    model, ran, out = fake_cuda_step(row, backend)
    assert ran == {"self_attention": backend, "cross_attention": backend}
    assert out.loss_sum.device == torch.device("cuda", 0) and out.loss_sum.dtype == torch.float32
    assert out.loss_sum.shape == () and out.num_supervised == row.num_supervised
    layers = model.language_model.config.num_hidden_layers
    assert layers == 32 and len(model.cross_attn_blocks()) == 8
    if backend == "flash_attn" and varlen._flash_attn_func() is None:
        assert documented_flash_attn_varlen_func.calls == layers + 8  # every attention call
    if torch.cuda.is_available():  # a driver answers: the fake backward can run (bench/gpu.sh)
        out.loss_sum.backward()
        assert all(p.grad is not None and p.grad.device.type == "cuda"
                   for p in model.parameters() if p.requires_grad)
        return
    # Why the backward runs on `meta` without a GPU (module docstring); notices a torch that allows it.
    with pytest.raises(RuntimeError, match="hasPrimaryContext"):
        out.loss_sum.backward()


@pytest.mark.parametrize("backend,checkpointing", [("torch_varlen", True), ("torch_varlen", False),
                                                   ("sdpa", True)])
def test_9b_packed_backward_traces_on_meta(row, backend, checkpointing):
    """Forward + backward on `meta` (CUDA's kernels via their meta functions): every LoRA
    parameter, and nothing else, gets a bf16 gradient of its own shape."""
    model = nine_b(backend, checkpointing).to(BF16)
    with cuda_kernels_offered():
        assert model.attention_backends(BF16, "meta")["self_attention"] == backend
        packed_loss(model, model.lm_head, row.to("meta", BF16)).loss_sum.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    for name, p in trainable:
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == BF16, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _plan_on_the_host(seqlens, head_width, device="cpu"):
    """Planted bug: the self-attention plan built on the CPU whatever the activations' device."""
    return varlen.causal_rows_plan(seqlens, head_width, "cpu")


def _fused_with_a_host_read(*args, **kwargs):
    """Planted bug: the fused path reads the token count back from the device (a host sync)."""
    int(args[4][-1])  # cu_seqlens_q
    return _real_fused(*args, **kwargs)


_real_fused = varlen._fused


@pytest.mark.parametrize("backend,target,plant,error", [
    ("sdpa", "mmgpt.models.flamingo.causal_rows_plan", _plan_on_the_host, FakeTensorDeviceMismatchError),
    ("torch_varlen", "mmgpt_kernels.varlen._fused", _fused_with_a_host_read, DataDependentOutputException),
])
def test_planted_cuda_path_bug_fails_the_trace(row, backend, target, plant, error):
    with mock.patch(target, plant), pytest.raises(error):
        fake_cuda_step(row, backend)


def test_liger_declines_fake_tensors_and_says_why():
    model = nine_b("auto")
    norms = sum(1 for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")
    reason = apply_liger(model, "cuda")
    assert reason is not None and ("needs CUDA" in reason or "not installed" in reason)
    assert sum(1 for m in model.modules() if type(m).__name__ == "LlamaRMSNorm") == norms


# ---- the same row for real, on a GPU (bench/gpu.sh) -------------------------------------------


def _lora_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad])


def test_9b_fused_backends_match_sdpa_on_a_real_gpu(row):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the real-number half of the fake-CUDA 9B step")
    with torch.device("cuda"):  # random weights initialised where they live
        model = build_model(ModelConfig(preset="9b", gradient_checkpointing=True), device="cuda", dtype=BF16).model
    open_gates(model, 0.5)
    randomize_lora_b(model)
    batch = row.to("cuda", BF16)
    results = {}
    for backend in [b for b in ("sdpa", "torch_varlen", "flash_attn")
                    if b in varlen.available_backends("cuda")]:
        model.set_attn_backend(backend)
        model.zero_grad(set_to_none=True)
        loss = packed_loss(model, model.lm_head, batch).loss_sum
        loss.backward()
        results[backend] = (float(loss), _lora_grads(model))
    assert len(results) >= 2, f"no fused backend on this GPU: {sorted(results)}"
    ref_loss, ref_grad = results.pop("sdpa")
    for backend, (loss, grad) in results.items():
        assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (backend, loss, ref_loss)
        rel = float((grad - ref_grad).norm() / ref_grad.norm())
        assert rel <= GRAD_RTOL, (backend, rel)
