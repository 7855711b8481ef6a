"""Streaming decode that never shows half a character.

LLaMA's tokenizer spells a character outside its vocabulary as UTF-8 byte tokens (`<0xE6>`,
`<0x97>`, `<0xA5>` for 日). Decoding the tokens so far after each step turns an unfinished byte
sequence into U+FFFD, and sentencepiece then replaces the WHOLE run of adjacent byte tokens, so a
finished 日 just before it flickers to "\ufffd\ufffd\ufffd\ufffd" too. `complete_text` decodes the
longest prefix that does not end inside a character: trailing byte tokens are held back one at a
time until the text no longer ends in U+FFFD (at most 3: a UTF-8 character has at most 4 bytes).
transformers' streamers hold back whole words, or show the replacement characters.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
MAX_HELD = 3  # bytes of an unfinished UTF-8 character


def complete_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """`ids` decoded without special tokens, up to the last complete character."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    held = 0
    while text.endswith(REPLACEMENT) and held < MAX_HELD and held < len(ids) and _is_byte(tokenizer, ids[-1 - held]):
        held += 1
        text = tokenizer.decode(ids[:len(ids) - held], skip_special_tokens=True)
    return text if not text.endswith(REPLACEMENT) else tokenizer.decode(ids, skip_special_tokens=True)


def _is_byte(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """Whether the token is a byte-fallback piece (`<0x..>`)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    return isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
