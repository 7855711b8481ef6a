"""mmgpt_kernels: packed (varlen) attention with a portable path and CUDA fused backends."""
from mmgpt_kernels.varlen import (BACKENDS, MaskedPlan, available_backends,
                                  causal_rows_plan, masked_attention, resolve_backend,
                                  segment_mask_plan, usable_backends, varlen_attention)

__all__ = ["BACKENDS", "MaskedPlan", "available_backends", "causal_rows_plan",
           "masked_attention", "resolve_backend", "segment_mask_plan", "usable_backends",
           "varlen_attention"]
