"""The contracts shared by the data, model, training and inference packages.

records -> Conversation -> TokenizedSample (this file) -> packer -> PackedBatch (this file) -> model.
Everything here is plain data (no model or data logic), so every package may import it and none
needs another package for it: the special tokens, IGNORE_INDEX, TokenizedSample, PackedBatch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from mmgpt.media import MediaLayout

IGNORE_INDEX = -100  # label of an unsupervised position (transformers' and torch's convention)

# The special tokens OpenFlamingo / MultiModal-GPT add to the LLaMA vocabulary. Order matters for
# checkpoint compatibility: they become ids 32000, 32001, 32002 (embedding rows of the released
# checkpoints).
ENDOFCHUNK = "<|endofchunk|>"
IMAGE = "<image>"
PAD = "<PAD>"


@dataclass
class TokenizedSample:
    """One conversation, tokenised with the unified template.

    `labels[i]` is `input_ids[i]` where token i is supervised (a response token or a round's EOS)
    and IGNORE_INDEX elsewhere: NOT shifted. The packer shifts inside the sample.
    `images` are CLIP-transformed tensors [3, H, W], one per `<image>` token, in order.
    """

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    source: str = ""
    is_vl: bool = False
    index: int = -1  # position in the epoch order (data position for exact resume); -1 = ad hoc

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class PackedBatch:
    """Several samples (and their images) concatenated into one flat sequence of T tokens.

    Self-attention is causal inside each [cu_seqlens[s], cu_seqlens[s+1]) span; `seqlens` are the
    same spans' lengths as host ints, so the model never reads cu_seqlens back (a host sync on
    CUDA). `media_index` says
    which image each token cross-attends (-1 none; the rule is the run's media attention, see
    mmgpt/media.py), and `media_layout` is the cross-attention work derived from it on the host: the
    tokens of samples with images, their text chunks and key layout (None: no sample has an
    image, so every token skips the cross-attention blocks).
    """

    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, next-token target (shifted within the sample), -100 = none
    position_ids: torch.Tensor  # [T] long, 0.. per sample
    cu_seqlens: torch.Tensor  # [S+1] int32
    max_seqlen: int
    seqlens: tuple[int, ...]  # [S] host lengths of the samples (cu_seqlens' differences)
    images: torch.Tensor  # [M, 3, H, W] float (M may be 0)
    media_index: torch.Tensor  # [T] long, image each token cross-attends, -1 = none
    media_layout: MediaLayout | None  # cross-attention layout over the tokens of samples with images
    supervised_index: torch.Tensor  # [N] long, positions whose label is not IGNORE_INDEX
    sample_index: torch.Tensor  # [T] long, sample each token belongs to
    sources: list[str]  # [S] source name per sample
    is_vl: torch.Tensor  # [S] bool
    sample_ids: list[int] = field(default_factory=list)  # TokenizedSample.index of each sample
    num_rows: int = 1  # rows of `row_tokens` this batch was packed into
    row_tokens: int = 0  # capacity of one row (0: unpacked)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_supervised(self) -> int:
        return int(self.supervised_index.numel())

    @property
    def efficiency(self) -> float:
        """Real tokens / (rows x row capacity): 1.0 means no padding or empty room."""
        cap = self.num_rows * self.row_tokens
        return self.num_tokens / cap if cap else 1.0

    def model_inputs(self) -> dict[str, object]:
        """The keyword arguments of `Flamingo.forward` (plain tensors and the media layout)."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, cu_seqlens=self.cu_seqlens,
                    max_seqlen=self.max_seqlen, seqlens=self.seqlens, images=self.images,
                    media_layout=self.media_layout)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PackedBatch":
        """Move tensors to `device`; `dtype` applies to images only (ids stay integer)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):  # non_blocking: pinned batches from the loader copy async
                v = v.to(device=device, dtype=dtype if f.name == "images" else None, non_blocking=True)
            elif isinstance(v, MediaLayout):
                v = v.to(device)
            out[f.name] = v
        return PackedBatch(**out)
