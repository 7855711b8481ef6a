"""`mmgpt chat`: multi-round image chat in the terminal, in the exact training template.

Each question re-encodes the whole conversation with the data side's `encode_prompt` (paper
Table 2: `### Image:` header, later rounds as `### Instruction / ### Response`, one BOS and EOS
per round), the code path training tokenises with, so the model sees exactly the token ids it was
trained on. The original app.py rendered its chat history differently from its training data
(one string, one BOS, by default only the last round); training's rendering is used here. The
image is encoded once per conversation; its perceiver latents are reused by every round and
every generated token, in the model's media attention.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TextIO

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from mmgpt.data.conversation import Conversation, Round, encode_prompt
from mmgpt.data.images import open_rgb
from mmgpt.inference.generation import GenerationConfig, generate
from mmgpt.inference.model_dir import DTYPES, load_model, resolve_source
from mmgpt.inference.text_stream import complete_text
from mmgpt.models.builder import BuiltModel, ModelConfig, build_model

UPLOADED_IMAGE = "<uploaded image>"  # placeholder path: render only counts images


class ChatSession:
    """One conversation: its rounds (question, answer) and its image's latents (or none)."""

    def __init__(self, built: BuiltModel, generation: GenerationConfig):
        self.built = built
        self.tokenizer = built.tokenizer
        self.generation = generation
        self.max_length = int(built.model.language_model.config.max_position_embeddings)
        self.rounds: list[Round] = []
        self.latents: torch.Tensor | None = None

    def clear(self) -> None:
        """Forget the rounds and the image."""
        self.rounds, self.latents = [], None

    @torch.no_grad()
    def set_image(self, image: Image.Image | None) -> None:
        """Start a new conversation about `image` (images precede the first round in the template)."""
        self.clear()
        if image is not None:
            pixels = self.built.transform(image.convert("RGB"))[None].to(self.built.device)
            self.latents = self.built.model.encode_images(pixels)

    def history(self) -> list[list[str]]:
        return [[r.instruction, r.response] for r in self.rounds]

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the conversation so far plus `question`, ending at `### Response:\\n`.

        Oldest rounds are dropped when the prompt plus `max_new_tokens` would pass the model's
        context (the image header always stays)."""
        images = [UPLOADED_IMAGE] if self.latents is not None else []
        rounds = self.rounds
        while True:
            conv = Conversation(rounds=rounds + [Round(question, "")], images=images)
            ids = encode_prompt(conv, self.tokenizer)
            if len(ids) + self.generation.max_new_tokens <= self.max_length or not rounds:
                break
            rounds = rounds[1:]
        if len(ids) >= self.max_length:
            raise ValueError(f"the question is too long: {len(ids)} prompt tokens for a "
                             f"{self.max_length}-token context")
        return ids

    def ask(self, question: str, streamer: BaseStreamer | None = None) -> str:
        """Answer one question in the context of the conversation so far (and remember it);
        `streamer` (a transformers streamer) sees the answer's tokens as they are generated."""
        question = question.strip()
        if not question:
            raise ValueError("empty question")
        ids = self.prompt_ids(question)
        room = min(self.generation.max_new_tokens, self.max_length - len(ids))
        new = generate(self.built, ids, self.latents, replace(self.generation, max_new_tokens=room),
                       streamer=streamer)
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.rounds.append(Round(question, answer))
        return answer


def load_image_file(path: str | Path) -> Image.Image:
    """An image the user named; errors say which file and why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    image = open_rgb(path)  # the pixel cap is checked before anything is decoded
    if isinstance(image, str):
        raise ValueError(f"{path}: not a usable image ({image})")
    return image


@dataclass(frozen=True)
class LoadOptions:
    """Which model a chat or the demo loads, and how (flags: mmgpt/cli/chat.py)."""

    model: str | None  # export dir, training output dir or adapter dir; None: the untrained tiny preset
    device: str  # a torch device ("auto" was resolved by the command line)
    dtype: str | None  # a key of DTYPES; None: bf16 on CUDA, fp32 on CPU


def session_factory(args: LoadOptions, generation: GenerationConfig) -> Callable[[], ChatSession]:
    """Load the model once; each call makes a fresh conversation on it. Without a model (serve
    only) the untrained tiny preset is used, so the demo page can be tried with no weights."""
    dtype = DTYPES[args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")]
    if args.model is None:
        print("warning: no --model given; serving the UNTRAINED tiny preset (answers are noise)",
              file=sys.stderr)
        built = build_model(ModelConfig(preset="tiny"), device=args.device, dtype=dtype)
        built.model.eval()
    else:
        built = load_model(resolve_source(args.model), device=args.device, dtype=dtype)
    return lambda: ChatSession(built, generation)


HELP = ("commands (never sent to the model): /image PATH  start a conversation about an image,"
        " /clear  forget the history and image, /help  this list, /quit  leave")


class TerminalStreamer(BaseStreamer):
    """Writes the answer to `out` as its characters complete (`complete_text`: a character spelt
    in byte tokens appears whole, never as U+FFFD), and a newline at the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO):
        self.tokenizer = tokenizer
        self.out = out
        self.tokens: list[int] = []
        self.shown = ""

    def put(self, value) -> None:
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = complete_text(self.tokenizer, self.tokens)
        if text.startswith(self.shown) and text != self.shown:
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _read_line(lines: TextIO, out: TextIO) -> str | None:
    """The next input line; a terminal gets line editing and history (readline), a pipe is read."""
    if lines is sys.stdin and sys.stdin.isatty():
        import readline  # noqa: F401 - importing it gives input() editing and history

        try:
            return input("You: ")
        except EOFError:
            return None
    print("You: ", end="", file=out, flush=True)
    return lines.readline() or None


def interact(session: ChatSession, lines: TextIO, out: TextIO) -> None:
    """The terminal loop: questions and commands from `lines` until /quit or end of input; answers
    stream as they are generated."""
    print(HELP, file=out, flush=True)
    while (line := _read_line(lines, out)) is not None:
        line = line.strip()
        try:
            if line == "/quit":
                return
            if line == "/help":
                print(HELP, file=out, flush=True)
            elif line == "/clear":
                session.clear()
                print("(history and image cleared)", file=out, flush=True)
            elif line.startswith("/image"):
                session.set_image(load_image_file(line[len("/image"):].strip()))
                print("(new conversation about this image)", file=out, flush=True)
            elif line.startswith("/"):
                print(f"unknown command {line.split()[0]!r}; {HELP}", file=out, flush=True)
            elif line:
                print("MMGPT: ", end="", file=out, flush=True)
                session.ask(line, streamer=TerminalStreamer(session.tokenizer, out))
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=out, flush=True)


def chat(load: LoadOptions, generation: GenerationConfig, image: str | None, prompt: str | None) -> int:
    """`mmgpt chat`: about `image` (if any), answer `prompt` and exit, or else talk in the terminal."""
    session = session_factory(load, generation)()
    if image:
        session.set_image(load_image_file(image))
    if prompt is not None:
        print(session.ask(prompt), flush=True)
        return 0
    interact(session, sys.stdin, sys.stdout)
    return 0
