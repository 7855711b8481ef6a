"""Optional liger-kernel (Triton) kernels for the LLaMA side: RMSNorm, RoPE and SwiGLU.

Why by hand rather than `liger_kernel.transformers.apply_liger_kernel_to_llama(model=...)`: that
walks `layer.mlp` / `layer.input_layernorm` of each decoder layer, and ours are FlamingoLayers
that hold the LLaMA layer as `decoder_layer`. Here every LlamaRMSNorm module is replaced by a
LigerRMSNorm holding the same weight, every LlamaMLP keeps its (possibly LoRA-wrapped) projections
and only fuses SiLU(gate) * up, and RoPE is swapped in transformers' llama module (looked up at
call time, so built models use it). peft LoRA and the FlamingoLayer composition are untouched.
Liger needs CUDA and Triton: anywhere else `apply_liger` changes nothing and says why.
"""
from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from transformers.models.llama import modeling_llama


def liger_unavailable(device: torch.device | str) -> str | None:
    """Why liger kernels cannot run on `device`, or None when they can."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"liger-kernel needs CUDA (Triton); device is {torch.device(device)}"
    try:
        import liger_kernel  # noqa: F401
        import triton  # noqa: F401
    except ImportError as err:
        return f"liger-kernel is not installed ({err})"
    return None


def _swiglu_forward(self: nn.Module, x: Tensor) -> Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def apply_liger(model: nn.Module, device: torch.device | str) -> str | None:
    """Swap liger kernels into `model`'s LLaMA modules; None when applied, else the reason not."""
    reason = liger_unavailable(device)
    if reason is not None:
        return reason
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    norms = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, modeling_llama.LlamaRMSNorm)]
    for parent, name, norm in norms:
        fused = LigerRMSNorm(norm.weight.shape[0], eps=norm.variance_epsilon).to(norm.weight)
        fused.weight = norm.weight  # the same (frozen) parameter, so state dicts are unchanged
        setattr(parent, name, fused)
    for module in model.modules():
        if isinstance(module, modeling_llama.LlamaMLP):
            module.forward = types.MethodType(_swiglu_forward, module)
    modeling_llama.apply_rotary_pos_emb = liger_rotary_pos_emb
    return None
