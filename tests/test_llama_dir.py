"""LLaMA directories as the 2023 conversion script wrote them: sharded `pytorch_model-0000k-of-0000n.bin`
+ `pytorch_model.bin.index.json`, `tokenizer.model` with `LlamaTokenizer` and no `tokenizer.json`.

Written the way transformers 4.x's `save_pretrained(safe_serialization=False, max_shard_size=...)` did
(transformers 5 writes only safetensors): huggingface_hub's `split_torch_state_dict_into_shards` of
the model's `state_dict()`, one `torch.save` per shard, its index.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import LlamaConfig, LlamaForCausalLM

from mmgpt.models.builder import ModelConfig, build_model
from mmgpt.models.pretrained import WeightsError
from mmgpt.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

TEXTS = ["Hello world", "### Instruction:\nWhat colour is the bus?\n\n### Response:\n", "<image> a  b\tc ünï"]


def write_2023_llama_dir(root, planted=None) -> LlamaForCausalLM:
    torch.manual_seed(7)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                                         num_attention_heads=4, vocab_size=1000, tie_word_embeddings=False))
    llama.config.save_pretrained(root)
    state = llama.state_dict()
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size="100KB")
    assert split.is_sharded and len(split.filename_to_tensors) > 3
    for i, (name, keys) in enumerate(sorted(split.filename_to_tensors.items())):
        shard = {k: state[k] for k in keys}
        if planted is not None and i == 1:
            shard["planted"] = planted
        torch.save(shard, root / name)
    (root / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
    for f in TINY_TOKENIZER_DIR.iterdir():  # tokenizer.model + tokenizer_config.json (LlamaTokenizer)
        shutil.copy(f, root / f.name)
    return llama


def test_sharded_bin_directory_loads_every_weight(tmp_path):
    llama = write_2023_llama_dir(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    built = build_model(ModelConfig(preset="tiny", llama_path=str(tmp_path), lora="none"))
    model, tok = built.model, built.tokenizer
    ours = model.language_model.state_dict()
    for k, v in llama.state_dict().items():
        name = re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1.decoder_layer.", k)
        assert torch.equal(ours[name][:1000] if "embed_tokens" in k or "lm_head" in k else ours[name], v), k
    assert len(tok) == 1003


def test_2023_tokenizer_ids_equal_todays_form(tmp_path):
    """The sentencepiece-only directory and the same tokenizer saved today (tokenizer.json) give equal ids."""
    old = load_tokenizer(TINY_TOKENIZER_DIR)
    today = tmp_path / "today"
    old.save_pretrained(today)
    assert (today / "tokenizer.json").exists()
    new = load_tokenizer(today)
    for text in TEXTS:
        assert old(text)["input_ids"] == new(text)["input_ids"], text
    assert old.convert_tokens_to_ids(["<image>", "<|endofchunk|>", "<PAD>"]) == \
        new.convert_tokens_to_ids(["<image>", "<|endofchunk|>", "<PAD>"]) == [1001, 1000, 1002]


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_pickle_in_a_shard_is_refused_in_one_line_without_running(tmp_path):
    marker = tmp_path / "pwned"
    write_2023_llama_dir(tmp_path, planted=Planted(marker))
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(tmp_path))}: .*pytorch_model-00002-of-\d+\.bin.*"
                                           r"weights-only"):
        build_model(ModelConfig(preset="tiny", llama_path=str(tmp_path), lora="none"))
    assert not marker.exists()
