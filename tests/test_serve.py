"""`mmgpt serve`: the gradio app (`build_demo`), launched once on loopback in this module and
driven with gradio_client over real HTTP: a multi-round image chat whose answers (and every
streamed partial answer) match a local ChatSession's, the sliders, refused settings and
messages, Clear, the pixel cap on uploads, two clients at once (queued, never interleaved), the
loopback default, and the one-line errors of the command (busy port, gradio not installed).
The page itself is driven in a headless browser by tests/test_serve_browser.py."""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from test_export import make_run

from mmgpt.cli import build_parser, main
from mmgpt.inference.chat import ChatSession
from mmgpt.inference.generation import GenerationConfig
from mmgpt.inference.model_dir import load_model, resolve_source
from mmgpt.inference import serve as serve_mod

DEFAULTS = GenerationConfig(max_new_tokens=6)
SLIDERS = ("max_new_tokens", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "do_sample")


def settings(**changes) -> tuple:
    """The sliders' values in the order `send` takes them: DEFAULTS with `changes`."""
    values = {name: getattr(DEFAULTS, name) for name in SLIDERS} | changes
    return tuple(values[name] for name in SLIDERS)


class RecordingSession(ChatSession):
    """A ChatSession that logs when each answer starts and ends (shared log across sessions)."""

    log: list[tuple[str, float]] = []

    def ask(self, question, streamer=None):
        self.log.append(("start", time.monotonic()))
        try:
            return super().ask(question, streamer=streamer)
        except serve_mod.Cancelled:
            self.log.append(("cancelled", time.monotonic()))
            raise
        finally:
            self.log.append(("end", time.monotonic()))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve"))[0]


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(resolve_source(run_dir))


def new_session(loaded, cls: type[ChatSession] = ChatSession, **generation) -> ChatSession:
    from dataclasses import replace

    return cls(loaded, replace(DEFAULTS, **generation))


def local_answers(loaded, image: Image.Image | None, questions, **generation) -> list[list[str]]:
    local = new_session(loaded, **generation)
    local.set_image(image)
    return [[q, local.ask(q)] for q in questions]


def launched(make_session) -> tuple:
    """build_demo on a free loopback port, serving in a thread: (demo, url)."""
    demo = serve_mod.build_demo(make_session, DEFAULTS)
    return demo, serve_mod.launch(demo, port=0, block=False)


OFF_LOOPBACK: list = []  # every address or name this process tried to reach beyond loopback


def is_loopback(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def recording_off_loopback():
    """Record (and still make) every connection and name lookup that leaves loopback."""
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \
                and not is_loopback(address[0]):
            OFF_LOOPBACK.append(address)

    def getaddrinfo(host, *args, **kwargs):
        if not is_loopback(host):
            OFF_LOOPBACK.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda self, a: (check(self, a), real_connect(self, a))[1])
        mp.setattr(socket.socket, "connect_ex", lambda self, a: (check(self, a), real_connect_ex(self, a))[1])
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield


@pytest.fixture(scope="module")
def app(loaded):
    with recording_off_loopback():
        demo, url = launched(lambda: new_session(loaded, RecordingSession))
        yield demo, url
        demo.close()


def client(url: str):
    """A gradio_client for `url`. huggingface_hub (which builds its headers) would otherwise ask
    huggingface.co for a registry of coding agents: the test's client, not the demo, so it alone
    is told it is offline."""
    import huggingface_hub.constants
    from gradio_client import Client

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def picture(colour=(30, 90, 200)) -> Image.Image:
    img = Image.new("RGB", (40, 40), colour)
    for x in range(40):
        img.putpixel((x, (3 * x) % 40), (250, 250, 0))
    return img


def texts(history: list[dict]) -> list[tuple[str, str]]:
    """(role, text) per message; an image message is ("user", "<image>")."""
    out = []
    for message in history:
        parts = message["content"] if isinstance(message["content"], list) else [message["content"]]
        for part in parts:
            out.append((message["role"], part["text"] if part.get("type") == "text" else "<image>"))
    return out


def rounds(history: list[dict]) -> list[tuple[str, str]]:
    return [(role, text) for role, text in texts(history) if text != "<image>"]


def as_messages(qa: list[list[str]]) -> list[tuple[str, str]]:
    return [m for q, a in qa for m in (("user", q), ("assistant", a))]


def upload(c, image: Image.Image, tmp_path, name="picture.png"):
    from gradio_client import handle_file

    path = tmp_path / name
    image.save(path)
    return c.predict(handle_file(str(path)), api_name="/upload")


def test_binds_loopback_by_default(app):
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.share) == ("127.0.0.1", False)
    demo, url = app
    assert url.startswith("http://127.0.0.1:") and demo.server_name == "127.0.0.1" and not demo.share
    address = outward_address()
    if address is not None:  # the port answers on loopback only, not on the machine's own address
        recorded = len(OFF_LOOPBACK)
        with pytest.raises(OSError):
            socket.create_connection((address, demo.server_port), timeout=5).close()
        del OFF_LOOPBACK[recorded:]  # this test's own attempt, not the demo's


def test_no_file_outside_the_upload_cache_is_served(app):
    import urllib.error
    import urllib.request

    url = app[1]
    for path in (Path(__file__).resolve(), Path("/etc/passwd")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=30)
        assert refused.value.code in (403, 404)


def outward_address() -> str | None:
    """This machine's non-loopback IPv4 address (the route's source; no packet is sent), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_multi_round_image_chat_streams_the_local_answers(app, loaded, tmp_path):
    c = client(app[1])
    shown = upload(c, picture(), tmp_path)
    assert texts(shown) == [("user", "<image>")]  # the image is in the history from the start
    questions = ["What is in the image?", "What colour is it?"]
    expected = local_answers(loaded, picture(), questions)
    assert expected != local_answers(loaded, None, questions)  # the image matters to the answers
    for n, question in enumerate(questions, start=1):
        job = c.submit(question, *settings(), api_name="/send")
        box, history = job.result()
        assert box == "" and texts(history) == [("user", "<image>")] + as_messages(expected[:n])
        answer = expected[n - 1][1]
        partials = [rounds(out[1])[-1][1] for out in job.outputs() if rounds(out[1])[-1][0] == "assistant"]
        assert partials[-1] == answer and all(answer.startswith(p) for p in partials)
        assert any(p != answer for p in partials)  # streamed: shown before the answer was complete
    assert c.predict(api_name="/clear") == ([], None, "")
    _, history = c.predict("Hello?", *settings(), api_name="/send")
    assert texts(history) == as_messages(local_answers(loaded, None, ["Hello?"]))  # no image, no old rounds


def test_sliders_take_effect(app, loaded):
    c = client(app[1])
    question = "Describe the image in detail."
    short = local_answers(loaded, None, [question], max_new_tokens=1)
    full = local_answers(loaded, None, [question])
    assert short != full
    _, history = c.predict(question, *settings(max_new_tokens=1), api_name="/send")
    assert rounds(history) == as_messages(short)
    c.predict(api_name="/clear")
    beams = local_answers(loaded, None, [question], num_beams=3)
    _, history = c.predict(question, *settings(num_beams=3), api_name="/send")
    assert rounds(history) == as_messages(beams)


def test_bad_settings_and_messages_are_refused_visibly(app, tmp_path):
    from gradio_client.exceptions import AppError

    c = client(app[1])
    for message, slider, error in (
            ("hi", dict(num_beams=2, do_sample=True), "not both"),
            ("hi", dict(top_p=0.0), "less than minimum"),  # gradio checks the sliders' bounds
            ("x" * (serve_mod.MAX_MESSAGE_CHARS + 1), {}, f"over {serve_mod.MAX_MESSAGE_CHARS} characters"),
            ("   ", {}, "type a question")):
        with pytest.raises(AppError, match=error):
            c.predict(message, *settings(**slider), api_name="/send")
    from data_helpers import pixel_bomb_png
    from gradio_client import handle_file

    bomb = pixel_bomb_png(tmp_path / "bomb.png")
    with pytest.raises(AppError, match="image_too_large"):
        c.predict(handle_file(str(bomb)), api_name="/upload")
    import httpx  # past gradio_client, which checks the size itself: the server refuses it too

    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 2**20)  # over the 20 MB upload cap
    refused = httpx.post(f"{app[1]}gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert refused.status_code == 413, refused.text
    _, history = c.predict("Still there?", *settings(), api_name="/send")  # the demo keeps serving
    assert [role for role, _ in texts(history)] == ["user", "assistant"]


def test_concurrent_clients_queue_instead_of_interleaving(app, loaded, tmp_path):
    """Two users chat at the same time, each about their own image: each gets exactly its local
    session's answers, and the model answers one question at a time."""
    from concurrent.futures import ThreadPoolExecutor

    colours = [(30, 90, 200), (200, 40, 40)]
    users = [client(app[1]) for _ in colours]
    for n, (c, colour) in enumerate(zip(users, colours)):
        upload(c, picture(colour), tmp_path, f"user{n}.png")
    questions = ["What is in the image?", "Is it big?"]
    start = threading.Barrier(len(users))

    def converse(c) -> list:
        start.wait()
        return [rounds(c.predict(q, *settings(max_new_tokens=12), api_name="/send")[1])[-2:] for q in questions]

    RecordingSession.log.clear()
    with ThreadPoolExecutor(len(users)) as pool:
        got = list(pool.map(converse, users))
    for colour, answers in zip(colours, got):
        assert answers == [as_messages([qa]) for qa in local_answers(loaded, picture(colour), questions,
                                                                      max_new_tokens=12)]
    assert [kind for kind, _ in RecordingSession.log] == ["start", "end"] * 4  # one answer at a time


def test_a_text_file_named_png_gets_mmgpts_refusal(app, tmp_path, capfd):
    """Issue 22: gradio opened the upload itself and failed first (its generic "The upstream Gradio
    app has raised an exception", a traceback in the log); now mmgpt's one-line refusal, no traceback."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = tmp_path / "holiday.png"
    fake.write_text("these are my notes, not a picture\n")
    c = client(app[1])
    capfd.readouterr()
    with pytest.raises(AppError, match="the image was refused: corrupt_image"):
        c.predict(handle_file(str(fake)), api_name="/upload")
    log = capfd.readouterr()
    assert "Traceback" not in log.err + log.out
    assert texts(upload(c, picture(), tmp_path)) == [("user", "<image>")]  # real images still load


def test_api_clear_stops_a_running_answer(app, tmp_path):
    """Issue 22: the page's Clear cancelled a running answer but an API client's /clear did not.
    A 400-token answer (about 6 s on CPU here) is stopped at the next token after /clear."""
    c = client(app[1])
    upload(c, picture(), tmp_path)
    RecordingSession.log.clear()
    job = c.submit("Describe the image in detail.", *settings(max_new_tokens=400), api_name="/send")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 4 and time.monotonic() < deadline:  # a few tokens streamed
        time.sleep(0.05)
    assert len(job.outputs()) >= 4 and not job.done()
    cleared = time.monotonic()
    assert c.predict(api_name="/clear") == ([], None, "")
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    kinds = [kind for kind, _ in RecordingSession.log]
    assert kinds == ["start", "cancelled", "end"], kinds
    assert RecordingSession.log[-1][1] - cleared < 3.0
    _, history = c.predict("Hello?", *settings(), api_name="/send")  # the demo goes on, fresh
    assert [role for role, _ in texts(history)] == ["user", "assistant"]


def test_serve_command_reports_a_busy_port(run_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(run_dir), "--port", str(port)]) == 2
    assert "mmgpt serve: error" in capsys.readouterr().err


def test_serve_without_gradio_is_one_line(monkeypatch, capsys):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["serve", "--model", "/nonexistent"]) == 2  # refused before the path checks
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmgpt serve: error: the web demo needs gradio, an optional dependency: pip install -e '.[demo]'"]
    monkeypatch.setitem(sys.modules, "gradio", None)  # an import that fails all the same
    from mmgpt.preflight import PreflightError

    with pytest.raises(PreflightError, match=r"pip install -e '\.\[demo\]'"):
        serve_mod.import_gradio()



def test_streamer_shows_each_token_and_cancel_stops_generation(loaded):
    """The page's streamer: the text so far after every token (a prefix of the answer), and
    generation ends at the next token once its request is cancelled (Clear, a closed tab)."""
    session = new_session(loaded, max_new_tokens=12)
    streamer = serve_mod.SnapshotStreamer(session.tokenizer)
    answer = session.ask("What is in the image?", streamer=streamer)
    shown = list(streamer)
    assert shown[-1] == answer and all(answer.startswith(text) for text in shown) and len(shown) > 1

    class CancelledAfterOne(serve_mod.SnapshotStreamer):
        def put(self, value):
            super().put(value)
            self.cancel()
            self.steps = getattr(self, "steps", 0) + 1

    session = new_session(loaded, max_new_tokens=12)
    streamer = CancelledAfterOne(session.tokenizer)
    with pytest.raises(serve_mod.Cancelled):
        session.ask("What is in the image?", streamer=streamer)
    assert streamer.steps == 1 and session.history() == []  # nothing half-answered is remembered


def test_the_server_side_reached_nothing_beyond_loopback(app):
    """Everything above (launch, uploads, chats, the CLI's own launch) looked up no name and opened
    no connection off the machine: no analytics, version check or share server (the page's own
    requests are checked in tests/test_serve_browser.py)."""
    assert OFF_LOOPBACK == [], OFF_LOOPBACK
