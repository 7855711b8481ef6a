"""GenerationConfig: decoding settings, free of torch so that the `chat`/`serve` parsers (which take
their defaults from it) build without importing the model stack."""
from __future__ import annotations

import math

from dataclasses import dataclass


@dataclass
class GenerationConfig:
    """Decoding settings. Greedy by default; `num_beams > 1` is beam search, `do_sample` samples."""

    max_new_tokens: int = 256
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    repetition_penalty: float = 1.0  # 1.0 = none; CTRL-style, over prompt and generated tokens
    length_penalty: float = 1.0  # beam search: score = sum log p / generated_length ** length_penalty
    seed: int | None = None  # sampling seed (None: nondeterministic)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("choose beam search (num_beams > 1) or sampling (do_sample), not both")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use greedy instead)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
