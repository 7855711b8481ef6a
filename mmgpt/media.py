"""Which image each token cross-attends, and the text chunks the cross-attention kernels run on.

One owner for this logic: packing (training), generation (chat) and export probes all call
`media_index` and `MediaLayout.build`. Shared by `mmgpt.data` and `mmgpt.models`, so it imports
neither.

Media-attention modes (`ModelConfig.media_attention`), per sample, counting the sample's own images:
  next      OpenFlamingo v1 without media placement augmentation, which is how MultiModal-GPT was
            trained and chats: an `<image>` token attends its own image, any other token the NEXT
            image of its sample (the first image for tokens before it); tokens after the last
            image attend none (zero cross-attention output; the gated feed-forward still runs).
  previous  OpenFlamingo v2 / "attend previous": the latest `<image>` at or before the token;
            tokens before the first image attend none.
  random    OpenFlamingo v1's media placement augmentation: each sample flips a coin between the
            two. The original flips once per forward with Python's global RNG; here the coin is a
            seeded hash of (seed, sample key), so it is reproducible and survives exact resume.
            Inference of a `random` model uses `previous` (deterministic; answers see the image).

Samples WITHOUT images skip the gated cross-attention blocks entirely (attention and feed-forward),
as the original forward does for language-only batches (`vision_x=None`); in a packed row that is
decided per sample, so `MediaLayout.token_index` lists the tokens that go through the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch
from torch import Tensor

# The one type of the media-attention setting, whatever holds it (config, built model, packer).
MediaAttention = Literal["next", "previous", "random"]
MEDIA_ATTENTION_MODES: tuple[MediaAttention, ...] = get_args(MediaAttention)
_MASK64 = (1 << 64) - 1


def check_media_attention(media_attention: str) -> MediaAttention:
    if media_attention not in MEDIA_ATTENTION_MODES:
        raise ValueError(f"unknown media_attention {media_attention!r}; choose from {list(MEDIA_ATTENTION_MODES)}")
    return media_attention  # type: ignore[return-value]  # checked against the Literal's values


def splitmix64(seed: int, key: int) -> int:
    """A seeded, stateless hash (splitmix64): the same (seed, key) gives the same value anywhere."""
    z = (seed * 0x9E3779B97F4A7C15 + key + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def attends_previous(media_attention: MediaAttention, seed: int = 0, key: int = 0) -> bool:
    """Whether a sample uses "previous" semantics: fixed for next/previous, a seeded coin for random."""
    if check_media_attention(media_attention) == "random":
        return bool(splitmix64(seed ^ 0x6D6D677074, key) & 1)  # salted: independent of packer tiebreaks
    return media_attention == "previous"


def decoding_media_attention(media_attention: MediaAttention) -> MediaAttention:
    """The media attention chat and evaluation decode with (a `random` model decodes with `previous`)."""
    return "previous" if check_media_attention(media_attention) == "random" else media_attention


def media_index(input_ids: Tensor, image_token_id: int, attend_previous: bool | Tensor, *,
                images_before: Tensor | None = None, images_total: Tensor | None = None,
                image_offsets: Tensor | None = None) -> Tensor:
    """Image number each token of `input_ids` [B, T] attends, -1 for none ([B, T] long).

    Row b's own images are numbered from `image_offsets[b]` (default: this call's images numbered
    row after row, right for a fresh batch). A row continuing cached tokens passes
    `images_before[b]` (how many of its images those tokens held) and `images_total[b]` (all the
    images of its whole sequence; "next" needs it); by default the row holds only these tokens.
    `attend_previous` is one bool or one per row: a row's media attention resolved to "previous" or
    not (`attends_previous`; a `random` model's coin is per sample, so it cannot be one setting).
    """
    is_image = input_ids == image_token_id
    rows = input_ids.shape[0]
    device = input_ids.device
    before = torch.zeros(rows, dtype=torch.long, device=device) if images_before is None \
        else images_before.to(device).long()
    count = before[:, None] + torch.cumsum(is_image.long(), dim=1)  # images at or before each token
    total = count[:, -1] if count.shape[1] else before
    if images_total is not None:
        total = images_total.to(device).long()
    if image_offsets is None:
        image_offsets = torch.cumsum(total, 0) - total
    offsets = image_offsets.to(device).long()[:, None]
    previous = torch.where(count == 0, -1, offsets + count - 1)
    following = torch.where(is_image, offsets + count - 1,
                            torch.where(count < total[:, None], offsets + count, -1))
    prev_rows = torch.as_tensor(attend_previous, dtype=torch.bool, device=device).reshape(-1, 1)
    return torch.where(prev_rows, previous, following)


@dataclass
class MediaLayout:
    """The cross-attention work of one forward, computed on the host BEFORE the forward.

    `token_index` [N] are the flattened positions of the tokens that pass the gated cross-attention
    blocks (tokens of image-less samples skip them); None means every token. Over those N tokens:
    `media_index` [N] (image attended, -1 none) split into chunks, maximal runs of equal
    `media_index` (`cu_seqlens_q` [C+1] int32). Chunk c's keys are the latents of its image, or no
    key at all; `cu_image_chunks` [C+1] int32 counts chunks with an image (keys = that x the
    number of latents) and `chunk_images` [C'] names their images in chunk order.
    The same layout as host values (`chunk_lengths`, `chunk_has_image`, `num_images`) lets the
    kernels and checks run without reading a device tensor back: no host sync in the forward.
    """

    token_index: Tensor | None
    media_index: Tensor
    cu_seqlens_q: Tensor
    cu_image_chunks: Tensor
    chunk_images: Tensor
    chunk_lengths: tuple[int, ...]  # [C] tokens per chunk (host)
    chunk_has_image: tuple[bool, ...]  # [C] whether chunk c has keys (host)
    num_images: int  # images the layout refers to: 1 + the highest image index (0: none)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_lengths)

    @property
    def max_seqlen_q(self) -> int:
        return max(self.chunk_lengths, default=0)

    @property
    def has_keys(self) -> bool:
        return self.num_images > 0

    @classmethod
    def build(cls, media_index: Tensor, through: Tensor | None = None) -> "MediaLayout":
        """From the media index of every flattened token and (optionally) a bool mask of the
        tokens that pass the blocks (None: all). Reads its inputs on the host: call it where
        they live there (the packer) or where a sync does not matter (generation, probes)."""
        media_index = media_index.reshape(-1).long()
        token_index = None
        if through is not None:
            through = through.reshape(-1).bool()
            if not bool(through.all()):
                token_index = through.nonzero().flatten()
                media_index = media_index[token_index]
        n = media_index.numel()
        starts_mask = torch.ones(n, dtype=torch.bool, device=media_index.device)
        starts_mask[1:] = media_index[1:] != media_index[:-1]
        starts = starts_mask.nonzero().flatten()
        chunk_media = media_index[starts]
        cu_q = torch.cat([starts, starts.new_tensor([n])]).to(torch.int32)
        has_image = chunk_media >= 0
        cu_img = torch.zeros(chunk_media.numel() + 1, dtype=torch.int32, device=media_index.device)
        cu_img[1:] = torch.cumsum(has_image.to(torch.int32), 0)
        images = chunk_media[has_image]
        return cls(token_index=token_index, media_index=media_index, cu_seqlens_q=cu_q,
                   cu_image_chunks=cu_img, chunk_images=images,
                   chunk_lengths=tuple((cu_q[1:] - cu_q[:-1]).tolist()),
                   chunk_has_image=tuple(has_image.tolist()),
                   num_images=int(images.max()) + 1 if images.numel() else 0)

    def to(self, device: torch.device | str) -> "MediaLayout":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return MediaLayout(**moved)


def row_layout(input_ids: Tensor, image_token_id: int, media_attention: MediaAttention, *,
               images_before: Tensor | None = None, images_total: Tensor | None = None,
               image_offsets: Tensor | None = None) -> MediaLayout | None:
    """Layout of [B, T] rows that each hold one sequence (generation, probes), decoded with
    `decoding_media_attention(media_attention)`; None when no row has an image, so the cross-attention blocks are
    skipped as for a language-only sample. Rows of one call share their images (beam search) or
    all have some (probes), so every row passes the blocks when any does.
    """
    before = torch.zeros(input_ids.shape[0], dtype=torch.long) if images_before is None else images_before
    total = images_total if images_total is not None else \
        before.to(input_ids.device) + (input_ids == image_token_id).sum(dim=1)
    if not bool((total > 0).any()):
        return None
    index = media_index(input_ids, image_token_id, decoding_media_attention(media_attention) == "previous",
                        images_before=images_before, images_total=total, image_offsets=image_offsets)
    return MediaLayout.build(index)
