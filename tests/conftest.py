"""Shared fixtures: CPU-only, deterministic, small."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent
REAL_SAMPLES = REPO.parent / "shared" / "real-samples"


@pytest.fixture(scope="session")
def real_samples() -> Path:
    if not REAL_SAMPLES.is_dir():
        pytest.skip(f"shared real samples not found at {REAL_SAMPLES}")
    return REAL_SAMPLES


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from mmgpt.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    return load_tokenizer(TINY_TOKENIZER_DIR)
