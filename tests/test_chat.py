"""`mmgpt chat`: prompts are token-for-token the training tokenisation, the image is encoded once
per conversation, history/clear/context trimming, the terminal loop, and `--prompt` from the CLI."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_export import make_run

from mmgpt.cli import main
from mmgpt.contracts import IGNORE_INDEX
from mmgpt.data.conversation import Conversation, Round, tokenize
from mmgpt.inference.chat import ChatSession, interact
from mmgpt.inference.generation import GenerationConfig
from mmgpt.inference.model_dir import load_model, resolve_source
from mmgpt.models.builder import preset_image_size

SIZE = preset_image_size("tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run, _ = make_run(tmp_path_factory.mktemp("chat"))
    return run


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(resolve_source(run_dir))


def picture(path: Path, color=(200, 40, 40)) -> Path:
    img = Image.new("RGB", (48, 40), color)
    for x in range(0, 48, 6):
        img.putpixel((x, x % 40), (10, 250, 10))
    img.save(path)
    return path


def session(loaded, max_new_tokens: int = 6) -> ChatSession:
    return ChatSession(loaded, GenerationConfig(max_new_tokens=max_new_tokens))


def test_prompt_ids_are_the_training_tokens(loaded, tmp_path):
    tok = loaded.tokenizer
    chat = session(loaded)
    chat.set_image(Image.open(picture(tmp_path / "a.png")))
    chat.ask("What is in the image?")
    chat.ask("Is it red?")
    question = "Describe it in detail."
    prompt = chat.prompt_ids(question)
    rounds = [Round(q, a) for q, a in chat.history()] + [Round(question, "Some answer.")]
    sample = tokenize(Conversation(rounds=rounds, images=["a.png"]), tok, max_length=10_000)
    assert not isinstance(sample, str), sample
    assert sample.input_ids[:len(prompt)] == prompt
    # the prompt ends exactly where training starts supervising the last response
    assert sample.labels[len(prompt) - 1] == IGNORE_INDEX and sample.labels[len(prompt)] != IGNORE_INDEX
    text = tok.decode(prompt)
    assert text.count("### Image:") == 1 and text.count("### Instruction:") == 3
    assert text.endswith("### Response:\n")


def test_image_encoded_once_per_conversation(loaded, tmp_path, monkeypatch):
    model = loaded.model
    calls = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda images: calls.append(images.shape) or encode(images))
    chat = session(loaded)
    chat.set_image(Image.open(picture(tmp_path / "a.png")))
    for q in ("One?", "Two?", "Three?"):
        chat.ask(q)
    assert calls == [torch.Size([1, 3, SIZE, SIZE])]
    assert len(chat.history()) == 3


def test_clear_and_text_only(loaded):
    chat = session(loaded)
    chat.ask("Tell me a joke.")
    assert "### Image:" not in loaded.tokenizer.decode(chat.prompt_ids("Again?"))
    chat.clear()
    assert chat.history() == [] and chat.latents is None


def test_special_token_text_stays_text_and_empty_questions_are_rejected(loaded):
    """A question (or a remembered answer) spelling "<image>" or "</s>" is ordinary text: it never
    becomes a special id, so it can neither fake an image nor end a round."""
    chat = session(loaded)
    tok = loaded.tokenizer
    plain = chat.prompt_ids("look here")
    chat.rounds = [Round("q", "an answer that says </s> and <s>")]
    ids = chat.prompt_ids("look <image> here <PAD>")
    specials = {tok.convert_tokens_to_ids(t) for t in ("<image>", "<PAD>")}
    assert not specials & set(ids) and not specials & set(plain)
    assert ids.count(tok.bos_token_id) == 2 and ids.count(tok.eos_token_id) == 1  # one per round
    with pytest.raises(ValueError, match="empty"):
        chat.ask("   ")


def test_oldest_rounds_dropped_when_context_is_full(loaded, tmp_path):
    chat = session(loaded, max_new_tokens=4)
    chat.set_image(Image.open(picture(tmp_path / "a.png")))
    chat.rounds = [Round("first question here", "first answer"), Round("second question", "second answer")]
    full = len(chat.prompt_ids("third?"))
    chat.max_length = full + 4 - 1  # one token short: the oldest round must go
    text = loaded.tokenizer.decode(chat.prompt_ids("third?"))
    assert "first question" not in text and "second question" in text and "### Image:" in text
    chat.max_length = 10
    with pytest.raises(ValueError, match="too long"):
        chat.prompt_ids("third?")


def test_interactive_loop(loaded, tmp_path):
    chat = session(loaded)
    lines = io.StringIO(f"/image {picture(tmp_path / 'a.png')}\nWhat is this?\n/image {tmp_path / 'missing.png'}\n"
                        "And now?\n/clear\nHello?\n/quit\nnever read\n")
    out = io.StringIO()
    interact(chat, lines, out)
    text = out.getvalue()
    assert text.count("MMGPT: ") == 3 and "image not found" in text and "cleared" in text
    assert len(chat.history()) == 1  # after /clear only "Hello?"


def test_chat_cli_answers_once(run_dir, loaded, tmp_path, capsys):
    img = picture(tmp_path / "a.png")
    assert main(["chat", "--model", str(run_dir), "--image", str(img), "--prompt", "What is this?",
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    chat = session(loaded)
    chat.set_image(Image.open(img))
    answer = chat.ask("What is this?")
    assert answer and printed.endswith(answer + "\n")


def test_pixel_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """chat and serve read the image size from the header and refuse a 169-megapixel PNG."""
    import PIL.Image

    from data_helpers import pixel_bomb_png
    from mmgpt.inference.chat import load_image_file
    from mmgpt.inference.serve import load_upload

    bomb = pixel_bomb_png(tmp_path / "bomb.png")
    decoded: list[int] = []
    real_load = PIL.Image.Image.load
    monkeypatch.setattr(PIL.Image.Image, "load", lambda self: decoded.append(1) or real_load(self))
    with pytest.raises(ValueError, match="image_too_large"):
        load_image_file(bomb)
    with pytest.raises(ValueError, match="image_too_large"):
        load_upload(str(bomb))  # what the web demo does with an upload (gradio hands it over as a file)
    assert decoded == []  # the pixels were never decoded


def test_answers_stream_in_a_terminal(run_dir, tmp_path):
    """`mmgpt chat` on a real pty: answer text reaches the terminal while tokens are still being
    generated. A test-side patch marks every decoding step with "<STEP>" on the same terminal, so
    streaming shows as answer text BEFORE the last step marker (a buffered answer comes after)."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    script = ("import sys; import mmgpt.inference.generation as g; extend = g.LanguageModelStepper.extend\n"
              "def marked(self, tokens):\n    sys.stdout.write('<STEP>'); sys.stdout.flush(); return extend(self, tokens)\n"
              "g.LanguageModelStepper.extend = marked\n"
              "from mmgpt.cli import main; sys.exit(main(sys.argv[1:]))\n")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script, "chat", "--model", str(run_dir), "--max-new-tokens", "40",
                             "--do-sample", "--seed", "3", "--temperature", "5"],
                            stdin=secondary, stdout=secondary, stderr=subprocess.DEVNULL, close_fds=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(secondary)
    def answered(screen: bytes) -> bool:  # the answer is done once the next prompt follows it
        return b"MMGPT: " in screen and b"You: " in screen.split(b"MMGPT: ", 1)[1]

    screen, deadline, sent = b"", time.monotonic() + 120, False
    try:
        while time.monotonic() < deadline and not answered(screen):
            if select.select([primary], [], [], 1)[0]:
                screen += os.read(primary, 4096)
            if not sent and b"You: " in screen:
                os.write(primary, b"Tell me a long story please\n")
                sent = True
    finally:
        os.write(primary, b"/quit\n")
        proc.wait(timeout=60)
        os.close(primary)
    answer = screen.split(b"MMGPT: ", 1)[1].split(b"You: ", 1)[0].decode(errors="replace")
    steps = answer.count("<STEP>")
    assert steps >= 5, screen[-2000:]
    before_last_step = answer[:answer.rindex("<STEP>")].replace("<STEP>", "").strip()
    assert before_last_step, f"no answer text before the last decoding step: {answer!r}"


class ForcedHead(torch.nn.Module):
    """An LM head whose greedy choice at generation step k is `ids[k]`, then EOS: forces an answer."""

    def __init__(self, ids: list[int], eos: int, vocab: int):
        super().__init__()
        self.ids, self.eos, self.vocab, self.calls = ids, eos, vocab, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.ids[self.calls] if self.calls < len(self.ids) else self.eos] = 1e4
        self.calls += 1
        return logits


BYTE_ANSWER = "Café 日本🙂 ok"  # é, 日, 本 and 🙂 are spelt in byte tokens by the tiny tokenizer


def test_streamed_byte_token_answers_never_show_a_replacement_character(loaded, monkeypatch):
    """chat's terminal streamer and the web demo's SnapshotStreamer, fed by a real generation forced
    to answer in byte-fallback tokens: every piece shown is valid text, the shown text only grows,
    and it ends as the whole answer (a plain decode of the partial ids shows U+FFFD: the control)."""
    from mmgpt.inference.chat import TerminalStreamer
    from mmgpt.inference.serve import SnapshotStreamer

    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(BYTE_ANSWER, add_special_tokens=False)
    assert sum(p.startswith("<0x") for p in tok.convert_ids_to_tokens(ids)) >= 10
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(len(ids)))  # what a naive streamer shows
    for make in (lambda: TerminalStreamer(tok, io.StringIO()), lambda: SnapshotStreamer(tok)):
        monkeypatch.setattr(model.language_model, "lm_head", ForcedHead(ids, tok.eos_token_id, len(tok)))
        chat = session(loaded, max_new_tokens=len(ids) + 1)
        streamer = make()
        writes: list[str] = []
        if isinstance(streamer, TerminalStreamer):
            streamer.out.write = writes.append  # type: ignore[method-assign]
            assert chat.ask("Say it", streamer=streamer) == BYTE_ANSWER
            shown = ["".join(writes[:k]) for k in range(1, len(writes) + 1)]
            assert shown[-1] == BYTE_ANSWER + "\n"
        else:
            assert chat.ask("Say it", streamer=streamer) == BYTE_ANSWER
            shown = list(streamer)
            assert shown[-1] == BYTE_ANSWER
        assert not any("\ufffd" in text for text in shown), shown
        assert all(b.startswith(a) for a, b in zip(shown, shown[1:])), shown
        assert len(shown) >= 5  # it streamed
