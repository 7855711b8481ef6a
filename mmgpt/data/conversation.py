"""Conversation (what every reader produces) and its tokenisation into a TokenizedSample.

Token ids are exactly the original MultiModal-GPT's (its datasets on the LLaMA tokenizer of its
time), for training and chat alike:
  - each round is tokenised on its own: BOS + its prompt and response + EOS (a dialogue has one
    BOS per round); prompt tokens are unsupervised, response tokens and the EOS supervised;
  - `<image>` is an added special token, and the tokenizer of that era stripped the whitespace on
    both sides of one, so `:\n<image>\n\n###` gives `:`, `<image>`, `▁###`; the text between two
    special tokens is encoded on its own, with SentencePiece's leading `▁`;
  - the prompt/response boundary is the prompt's own token count, as the original computes it; a
    token spanning the boundary would make chat prompts differ from training, so such a sample is
    dropped (never seen with the LLaMA tokenizer, whose newline is its own byte token).
Text from the data is always ordinary text: a record saying "<image>" or "</s>" gets the pieces of
those characters, never the special ids (the original would have turned them into special tokens).
Drops are returned as a reason string (never raised) so one bad record cannot stop a long run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from mmgpt.contracts import IGNORE_INDEX, IMAGE, TokenizedSample
from mmgpt.data.templates import ImageSlot, Piece, RoundText, render_rounds

# Drop reasons returned by tokenize (counted per source in the data report).
EMPTY_RESPONSE = "empty_response"
NO_ROUNDS = "no_rounds"
TOKEN_STRADDLES_BOUNDARY = "token_straddles_boundary"
TOO_LONG = "too_long"


@dataclass
class Round:
    """One instruction -> response exchange; `input` is the optional context (Dolly, Alpaca)."""

    instruction: str
    response: str
    input: str = ""


@dataclass
class Conversation:
    """A record in template-neutral form.

    `images` are paths relative to the source's image root (validated when loaded). `origin`
    names the file and record (e.g. "dolly.jsonl line 3") for error messages.
    """

    rounds: list[Round]
    images: list[str] = field(default_factory=list)
    source: str = ""
    origin: str = ""


def encode_pieces(tokenizer: PreTrainedTokenizerBase, pieces: list[Piece]) -> list[int]:
    """Ids of text and image slots, as the original's tokenizer gives them (no BOS/EOS added).

    Adjacent text joins into one chunk; a chunk loses its whitespace next to an image slot; each
    chunk is encoded separately (its own leading `▁`) with special-token strings kept as text.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    ids: list[int] = []
    chunks: list[str | ImageSlot] = []
    for piece in pieces:
        if isinstance(piece, str) and chunks and isinstance(chunks[-1], str):
            chunks[-1] += piece
        else:
            chunks.append(piece)
    for k, chunk in enumerate(chunks):
        if isinstance(chunk, ImageSlot):
            ids.append(image_id)
            continue
        if k > 0:
            chunk = chunk.lstrip()
        if k + 1 < len(chunks):
            chunk = chunk.rstrip()
        if chunk:
            ids += tokenizer(chunk, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def _encode_round(tokenizer: PreTrainedTokenizerBase, rnd: RoundText) -> tuple[list[int], list[int]] | str:
    """(ids, labels) of one round, or a drop reason."""
    prompt = encode_pieces(tokenizer, rnd.prompt)
    full = encode_pieces(tokenizer, rnd.prompt + [rnd.response])
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
        return TOKEN_STRADDLES_BOUNDARY
    ids = [tokenizer.bos_token_id] + full + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * (1 + len(prompt)) + full[len(prompt):] + [tokenizer.eos_token_id]
    return ids, labels


def tokenize(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedSample | str:
    """Tokenise with the unified template; a str return is the drop reason.

    Over-long conversations keep the whole leading rounds that fit in `max_length` tokens (the
    images all sit before the first round, so they are always kept with it). The original cut
    every sample at 512 tokens, mid-answer and then without EOS; whole rounds are kept here.
    """
    if not conv.rounds:
        return NO_ROUNDS
    if any(not r.response.strip() for r in conv.rounds):
        return EMPTY_RESPONSE
    ids: list[int] = []
    labels: list[int] = []
    for rnd in render_rounds(conv):
        encoded = _encode_round(tokenizer, rnd)
        if isinstance(encoded, str):
            return encoded
        if len(ids) + len(encoded[0]) > max_length:
            if not ids:
                return TOO_LONG
            break
        ids += encoded[0]
        labels += encoded[1]
    return TokenizedSample(input_ids=ids, labels=labels, source=conv.source, is_vl=bool(conv.images))


def encode_prompt(conv: Conversation, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Generation prompt: the training ids of every round but the last, then the last round's BOS
    and prompt (its response is left for the model). A prefix of `tokenize`'s ids whenever the
    last round is answered, so chat sees exactly the token boundaries training did."""
    if not conv.rounds:
        raise ValueError("encode_prompt needs at least one round (the question to answer)")
    *history, last = render_rounds(conv)
    ids: list[int] = []
    for rnd in history:
        ids += [tokenizer.bos_token_id, *encode_pieces(tokenizer, rnd.prompt + [rnd.response]), tokenizer.eos_token_id]
    return ids + [tokenizer.bos_token_id] + encode_pieces(tokenizer, last.prompt)
