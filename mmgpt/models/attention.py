"""The "mmgpt_varlen" transformers attention implementation for LLaMA self-attention.

Packed training rows carry `cu_seq_lens_q/k` and `max_length_q/k` kwargs: attention is then causal
inside each sample through `mmgpt_kernels.varlen_attention`, with no dense T x T mask. They also
carry `mmgpt_seq_lens`, the same sample lengths as host ints (built by the packer): transformers
forwards unknown kwargs from the model down to this function, so the per-segment kernel never
reads cu_seqlens back from the device (one host sync per layer otherwise), and, on the portable
sdpa backend, `mmgpt_attn_plan`: the batch's `RowsPlan` (built once by `Flamingo.forward`), so
each layer runs a few batched SDPA calls rather than one per sample. Anything
else (generation with a KV cache, padded batches) goes to transformers' own SDPA function with
the mask transformers builds.
"""
from __future__ import annotations

from mmgpt_kernels.varlen import resolve_backend, rows_attention, varlen_attention
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTN_IMPLEMENTATION = "mmgpt_varlen"


def mmgpt_varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """q/k/v [B, H, T, D]; returns ([B, T, H, D], None) as transformers expects."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one row of tokens, got batch {query.shape[0]}")
    backend = getattr(module.config, "mmgpt_attn_backend", "auto")
    plan = kwargs.get("mmgpt_attn_plan")
    if plan is not None and resolve_backend(backend, query) == "sdpa":  # device, dtype, head dim
        return rows_attention(query, key, value, plan, scale=scaling, heads_first=True), None
    out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           cu_q, kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"],
                           causal=True, scale=scaling, backend=backend,
                           seqlens_q=kwargs.get("mmgpt_seq_lens"), seqlens_k=kwargs.get("mmgpt_seq_lens"))
    return out.unsqueeze(0), None


def mmgpt_varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                      kv_offset: int = 0, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """No mask for cache-free, padding-free input (packed rows get their causality from cu_seqlens,
    a single sequence from SDPA's is_causal); otherwise transformers' SDPA mask (padding, cache)."""
    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, mmgpt_varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, mmgpt_varlen_mask)
