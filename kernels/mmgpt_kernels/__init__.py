"""mmgpt_kernels: packed (varlen) attention with a portable path and CUDA fused backends."""
from mmgpt_kernels.varlen import (BACKENDS, available_backends, resolve_backend, usable_backends,
                                  varlen_attention)

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "usable_backends",
           "varlen_attention"]
