"""LLaMA tokenizer loading with the three special tokens OpenFlamingo/MultiModal-GPT add
(`mmgpt.contracts`: `<|endofchunk|>`, `<image>`, `<PAD>`, in that order: ids 32000-32002 on the
LLaMA vocabulary). Shared by the data side (tokenisation) and the model side (embedding rows).
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mmgpt.configfile import ConfigError
from mmgpt.contracts import ENDOFCHUNK, IMAGE, PAD

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "resources" / "tiny_tokenizer"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a LLaMA tokenizer directory and add the Flamingo special tokens (idempotent)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:  # a directory without (usable) tokenizer files
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise ConfigError(f"cannot load a tokenizer from {path}: {message}") from err
    tok.add_special_tokens({"additional_special_tokens": [ENDOFCHUNK, IMAGE]})
    tok.add_special_tokens({"pad_token": PAD})
    probe = tok("Hello world", add_special_tokens=False)["input_ids"]
    if not probe:
        raise RuntimeError(f"tokenizer at {path} encodes text to nothing: is tokenizer.model valid?")
    return tok
