"""LLaMA tokenizer loading with the three special tokens OpenFlamingo/MultiModal-GPT add.

Order matters for checkpoint compatibility: `<|endofchunk|>`, `<image>`, `<PAD>` become ids
32000, 32001, 32002 on the LLaMA vocabulary (embedding rows of the released checkpoints).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

ENDOFCHUNK = "<|endofchunk|>"
IMAGE = "<image>"
PAD = "<PAD>"

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "resources" / "tiny_tokenizer"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a LLaMA tokenizer directory and add the Flamingo special tokens (idempotent)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"additional_special_tokens": [ENDOFCHUNK, IMAGE]})
    tok.add_special_tokens({"pad_token": PAD})
    probe = tok("Hello world", add_special_tokens=False)["input_ids"]
    if not probe:
        raise RuntimeError(f"tokenizer at {path} encodes text to nothing: is tokenizer.model valid?")
    return tok


def train_tiny_tokenizer(out_dir: str | Path, corpus: list[str], vocab_size: int = 2000) -> Path:
    """Train a LLaMA-style sentencepiece BPE (byte fallback) and write an HF tokenizer directory.

    Used to make the bundled `tiny` tokenizer; tests may call it for other sizes.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
