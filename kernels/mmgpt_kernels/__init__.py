"""mmgpt_kernels: packed (varlen) attention with a portable path and CUDA fused backends."""
from mmgpt_kernels.varlen import (BACKENDS, RowGroup, RowsPlan, available_backends,
                                  causal_rows_plan, key_rows_plan, resolve_backend,
                                  rows_attention, usable_backends, varlen_attention)

__all__ = ["BACKENDS", "RowGroup", "RowsPlan", "available_backends", "causal_rows_plan",
           "key_rows_plan", "resolve_backend", "rows_attention", "usable_backends",
           "varlen_attention"]
