"""`mmgpt serve`: the paper's web demo on gradio (`pip install -e '.[demo]'`).

Upload an image (it starts a new conversation: images sit in the prompt header of the training
template, so a conversation has its image from the start; it is shown in the chat history), ask
questions over several rounds and watch the answers stream in, tune decoding with the sliders
(max_new_tokens, num_beams, temperature, top_k, top_p, repetition_penalty, do_sample; their
defaults are the command line's), click an example prompt, Clear. `build_demo` makes the app
without launching it (to drive it with gradio_client or a browser); `launch` serves it; `serve` is
what `mmgpt serve` runs.

One model serves every browser; each browser's conversation is its own `ChatSession` in a
`gr.State` (server-side; the history shown is rebuilt from it, never taken from the client).
Everything that runs the model (image encoding, generation) shares one queue slot
(`concurrency_id="model"`, limit 1), so concurrent users wait their turn instead of interleaving,
and a lock keeps a cancelled generation's last step from overlapping the next one's.

Bounded: binds 127.0.0.1 unless `--host` says otherwise (the demo has no authentication) and
opens no share link unless `--share`; no request leaves the machine (analytics off, the default
theme's fonts ship with gradio, no SSR node server, no MCP server, no footer links). What gradio
itself provides: the upload size cap (`max_file_size`), the queue's length cap (`max_size`: more
users are told the queue is full), a cap on kept sessions (`state_session_capacity`) and their
lifetime (State `time_to_live`), slider values within their ranges, no file served from outside
its upload cache, and its CORS checks (`strict_cors`). What it does not: the session id is made
up by the page, and nothing is capped per client (the stdlib server this replaced did both).
What this module adds: a message length cap (MAX_MESSAGE_CHARS, checked on the server as well as
by the text box), the pixel cap checked from the image header before decoding (`open_rgb`;
gradio's `type="pil"` would decode first, so uploads arrive as file paths), decoding settings
validated by `GenerationConfig` and refused with a visible error, uploads handed over unopened
(`image_input`: a file that is no image gets mmgpt's one-line refusal, not gradio's generic error),
and generation that stops when its request is cancelled or its conversation cleared (Clear in the
page, /clear from an API client).
"""
from __future__ import annotations

import os
import queue
import socket
import sys
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from PIL import Image
from transformers.generation.streamers import BaseStreamer

from mmgpt.data.images import open_rgb
from mmgpt.inference.chat import ChatSession, LoadOptions, session_factory
from mmgpt.inference.text_stream import complete_text
from mmgpt.inference.generation_config import GenerationConfig
from mmgpt.preflight import GRADIO_HINT, require

if TYPE_CHECKING:
    import gradio as gr

TITLE = "MultiModal-GPT demo"
MAX_MESSAGE_CHARS = 4000
MAX_UPLOAD = "20mb"  # gradio refuses bigger uploads before they reach us
MAX_QUEUE = 32  # requests waiting for the model; more are told the queue is full
MAX_SESSIONS = 512  # conversations gradio keeps (its state_session_capacity)
SESSION_TTL_S = 2 * 3600  # a conversation untouched this long is forgotten
EXAMPLES = ["What is in the image?", "Describe the image in detail.", "Tell me more.",
            "What is unusual about this image?"]
CSS = "#chatbot .message { white-space: pre-wrap; } #chatbot img { max-height: 160px; width: auto; }"


def import_gradio():
    """gradio, with its analytics (and version check) off; a one-line user error if missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as err:
        require([f"{GRADIO_HINT} ({err})"])
    return gradio


class Cancelled(Exception):
    """Raised inside generation when its request has gone (Clear, a closed tab)."""


class SnapshotStreamer(BaseStreamer):
    """The answer so far after every generated token, for a consumer thread to iterate.

    transformers' TextIteratorStreamer holds text back until a word ends; this one shows every
    token (only a character still missing some of its byte tokens waits: `complete_text`).
    `cancel()` makes the next `put` raise Cancelled, which ends the generation."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.cancelled = threading.Event()

    def put(self, value) -> None:
        if self.cancelled.is_set():
            raise Cancelled
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = complete_text(self.tokenizer, self.tokens).lstrip()
        if text != self.shown:
            self.shown = text
            self.queue.put(text)

    def end(self) -> None:
        self.queue.put(None)

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        while (text := self.queue.get()) is not None:
            yield text


def load_upload(path: str) -> Image.Image:
    """An uploaded image as RGB; the pixel cap is checked from the header before decoding."""
    image = open_rgb(path)
    if isinstance(image, str):
        raise ValueError(f"the image was refused: {image}")
    return image


@dataclass
class Conversation:
    """One browser's conversation: its session and the uploaded image's file (for the history)."""

    session: ChatSession
    image_path: str | None = None
    streamer: "SnapshotStreamer | None" = None  # the answer being generated, for Clear to stop


def messages(conv: Conversation | None) -> list[dict[str, Any]]:
    """The chat history in gradio's message format, rebuilt from the server's own state."""
    if conv is None:
        return []
    shown: list[dict[str, Any]] = []
    if conv.image_path is not None:
        shown.append({"role": "user", "content": {"path": conv.image_path}})
    for question, answer in conv.session.history():
        shown += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return shown


def generation_settings(defaults: GenerationConfig, max_new_tokens, num_beams, temperature, top_k, top_p,
                        repetition_penalty, do_sample) -> GenerationConfig:
    """The sliders' values over the command line's config (its seed, length_penalty); an invalid
    combination (beam search with sampling, ...) raises ValueError."""
    return replace(defaults, max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   repetition_penalty=float(repetition_penalty), do_sample=bool(do_sample))


def image_input(gr, **kwargs) -> "gr.Image":
    """gr.Image that hands the uploaded file's path over unopened: gradio's own preprocessing opens
    it with PIL even for `type="filepath"`, so a text file named .png failed there (its generic
    error, a traceback in the log) before `load_upload` could refuse it in one line. The instance's
    `preprocess` is replaced, not subclassed: gradio writes a .pyi beside any module that defines
    a component class. The path has passed gradio's upload-cache checks, which run before it."""
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None or (payload.url or "").startswith("data:"):
            return gradio_preprocess(payload)
        return str(payload.path)

    image.preprocess = preprocess
    return image


class DemoHandlers:
    """What the page's events run, for one app: start a conversation on an upload, stream the
    answer to a question, clear. A mistake of the user is a `gr.Error` without a traceback."""

    def __init__(self, gr, new_session: Callable[[], ChatSession], defaults: GenerationConfig):
        self.gr = gr
        self.new_session = new_session
        self.defaults = defaults
        self.model_lock = threading.Lock()  # the queue serialises requests; this also covers a cancelled tail

    def refused(self, message: str) -> Exception:
        """The error the page shows; the user's mistake, so no traceback in the server's log."""
        return self.gr.Error(message, print_exception=False)

    def start(self, image_path: str | None) -> tuple[Conversation, list]:
        conv = Conversation(self.new_session())
        if image_path is not None:
            try:
                image = load_upload(image_path)
            except ValueError as err:
                raise self.refused(str(err)) from err
            with self.model_lock:
                conv.session.set_image(image)
            conv.image_path = image_path
        return conv, messages(conv)

    def checked(self, message: str, settings: tuple) -> tuple[str, GenerationConfig]:
        """The question and decoding settings of a request, or the refusal the page shows."""
        message = (message or "").strip()
        if not message:
            raise self.refused("type a question first")
        if len(message) > MAX_MESSAGE_CHARS:
            raise self.refused(f"the message is over {MAX_MESSAGE_CHARS} characters")
        try:
            return message, generation_settings(self.defaults, *settings)
        except ValueError as err:
            raise self.refused(f"invalid decoding settings: {err}") from err

    def respond(self, message: str, conv: Conversation | None, *settings):
        """Stream the answer (generation in a thread, the history shown after every token)."""
        message, config = self.checked(message, settings)
        if conv is None:
            conv = Conversation(self.new_session())
        conv.session.generation = config
        streamer = conv.streamer = SnapshotStreamer(conv.session.tokenizer)
        outcome: dict[str, Any] = {}
        shown = messages(conv) + [{"role": "user", "content": message}]
        thread = threading.Thread(target=self._generate, args=(conv.session, message, streamer, outcome),
                                  daemon=True, name="mmgpt-generate")
        thread.start()
        try:
            yield "", shown + [{"role": "assistant", "content": ""}], conv
            for partial in streamer:
                if streamer.cancelled.is_set():  # cleared: show nothing more (Clear emptied the page)
                    break
                yield "", shown + [{"role": "assistant", "content": partial}], conv
            thread.join()
        finally:
            streamer.cancel()  # a no-op once generation has ended; stops it when the request went
        yield from self._outcome(outcome, conv)

    def _generate(self, session: ChatSession, message: str, streamer: "SnapshotStreamer",
                  outcome: dict[str, Any]) -> None:
        try:
            with self.model_lock:
                outcome["answer"] = session.ask(message, streamer=streamer)
        except Exception as err:  # noqa: BLE001 - handed to the request (Cancelled included)
            outcome["error"] = err
            streamer.end()

    def _outcome(self, outcome: dict[str, Any], conv: Conversation):
        """The request's last update once generation has ended."""
        if isinstance(outcome.get("error"), Cancelled):  # stopped by /clear: an outcome, not an error;
            yield "", [], None  # a partial answer yielded as Clear ran must not restore the conversation
            return
        if isinstance(outcome.get("error"), ValueError):  # the question itself (too long)
            raise self.refused(str(outcome["error"]))
        if "error" in outcome:
            raise outcome["error"]
        yield "", messages(conv), conv

    def clear(self, conv: Conversation | None) -> tuple[None, list, None, str]:
        """Forget the conversation and stop its running answer: the page's Clear also cancels the
        request (`cancels=`), an API client's /clear only reaches this function."""
        if conv is not None and conv.streamer is not None:
            conv.streamer.cancel()
        return None, [], None, ""


def slider_ranges(defaults: GenerationConfig) -> dict[str, dict[str, Any]]:
    """Each decoding slider's range and label; a range always includes the command line's value."""
    return dict(
        max_new_tokens=dict(minimum=1, maximum=max(512, defaults.max_new_tokens), step=1, label="max_new_tokens"),
        num_beams=dict(minimum=1, maximum=max(8, defaults.num_beams), step=1, label="num_beams"),
        temperature=dict(minimum=min(0.05, defaults.temperature), maximum=max(2.0, defaults.temperature),
                         step=0.05, label="temperature"),
        top_k=dict(minimum=0, maximum=max(100, defaults.top_k), step=1, label="top_k (0: off)"),
        top_p=dict(minimum=min(0.05, defaults.top_p), maximum=1.0, step=0.01, label="top_p (1: off)"),
        repetition_penalty=dict(minimum=min(1.0, defaults.repetition_penalty),
                                maximum=max(2.0, defaults.repetition_penalty), step=0.05,
                                label="repetition_penalty (1: off)"),
    )


@dataclass
class Page:
    """The page's components that events read or write."""

    state: Any  # gr.State: the Conversation
    image: Any
    settings: list  # the sliders of `slider_ranges`, then do_sample: `generation_settings`' order
    chatbot: Any
    textbox: Any
    send: Any
    clear: Any


def page_layout(gr, defaults: GenerationConfig) -> Page:
    """The page (inside an open gr.Blocks): image and decoding settings left, the chat right."""
    gr.Markdown(f"# {TITLE}\nUpload an image (it starts a new conversation), then ask questions "
                "over several rounds. One model serves everyone: requests wait their turn.")
    state = gr.State(None, time_to_live=SESSION_TTL_S)
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input(gr, sources=["upload"], label="Image", elem_id="image", height=260)
            with gr.Accordion("Generation", open=True):
                settings = [gr.Slider(value=getattr(defaults, name), elem_id=name, **kw)
                            for name, kw in slider_ranges(defaults).items()]
                settings.append(gr.Checkbox(value=defaults.do_sample, label="do_sample", elem_id="do_sample"))
        with gr.Column(scale=2):
            chatbot = gr.Chatbot(label="MultiModal-GPT", elem_id="chatbot", height=580,
                                 render_markdown=False, feedback_options=None, buttons=["copy"])
            with gr.Row():
                textbox = gr.Textbox(show_label=False, placeholder="Ask something about the image",
                                     max_length=MAX_MESSAGE_CHARS, scale=4, elem_id="message")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear = gr.Button("Clear", elem_id="clear")
            gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[textbox], label="Example prompts")
    return Page(state, image, settings, chatbot, textbox, send, clear)


def connect(gr, page: Page, handlers: DemoHandlers) -> None:
    """The events: everything that runs the model shares one queue slot (`concurrency_id`)."""
    page.image.upload(handlers.start, inputs=[page.image], outputs=[page.state, page.chatbot],
                      concurrency_id="model", api_name="upload")
    chat = gr.on([page.send.click, page.textbox.submit], handlers.respond,
                 inputs=[page.textbox, page.state, *page.settings], outputs=[page.textbox, page.chatbot, page.state],
                 concurrency_id="model", api_name="send")
    cleared = [page.state, page.chatbot, page.image, page.textbox]
    page.clear.click(handlers.clear, inputs=[page.state], outputs=cleared, cancels=[chat],
                     concurrency_limit=None, api_name="clear")
    for also_clears in (page.image.clear, page.chatbot.clear):  # the image's x and the chat's own bin
        also_clears(handlers.clear, inputs=[page.state], outputs=cleared, cancels=[chat],
                    concurrency_limit=None, api_visibility="private")


def build_demo(new_session: Callable[[], ChatSession], defaults: GenerationConfig) -> "gr.Blocks":
    """The demo app (queued, not launched: see `launch`). `new_session` makes a fresh conversation
    on the shared model; `defaults` are the sliders' initial values."""
    gr = import_gradio()
    handlers = DemoHandlers(gr, new_session, defaults)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        connect(gr, page_layout(gr, defaults), handlers)
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    return demo


def launch(demo: "gr.Blocks", host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True) -> str:
    """Serve `demo` on host:port (port None or 0: a free one); returns the local URL. With
    `block=False` the server runs in a background thread (`demo.close()` stops it)."""
    gr = import_gradio()
    if not port:
        with socket.socket() as probe:  # gradio itself would scan 7860-7959
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    _, url, share_url = demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=True,
        max_file_size=MAX_UPLOAD, state_session_capacity=MAX_SESSIONS, show_error=False, quiet=True,
        ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False, inbrowser=False,
        theme=gr.themes.Default(), css=CSS, footer_links=[], run_history=False)
    if block:
        public = f", public link {share_url} (through gradio's servers)" if share_url else ""
        print(f"mmgpt demo on {url}{public} (Ctrl-C to stop)", flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    return url


def serve(load: LoadOptions, generation: GenerationConfig, host: str, port: int | None, share: bool) -> int:
    """`mmgpt serve`: load the model, serve the demo until Ctrl-C; 2 when the address is unusable."""
    new_session = session_factory(load, generation)  # bad model dir: a user error, one line
    demo = build_demo(new_session, generation)
    try:
        launch(demo, host, port, share)
    except OSError as err:  # port in use, unknown address
        print(f"mmgpt serve: error: {err}", file=sys.stderr)
        return 2
    return 0
