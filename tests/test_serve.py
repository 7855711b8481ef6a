"""`mmgpt serve`: real HTTP requests on loopback (server on port 0 in a thread): the page, a
multi-round image chat whose answers equal a local ChatSession's, clear history, bad requests.
The page itself is driven in a headless browser by tests/test_serve_browser.py."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image
from test_export import make_run

from mmgpt.cli import build_parser, main
from mmgpt.inference.chat import ChatSession
from mmgpt.inference.generation import GenerationConfig
from mmgpt.inference.model_dir import load_model, resolve_source
from mmgpt.inference.serve import ChatService, make_server
from mmgpt.models.builder import preset_image_size

SIZE = preset_image_size("tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve"))[0]


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(resolve_source(run_dir))


def new_session(loaded) -> ChatSession:
    return ChatSession(*loaded, SIZE, GenerationConfig(max_new_tokens=6))


@pytest.fixture(scope="module")
def url(loaded):
    server = make_server(ChatService(lambda: new_session(loaded)), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def picture() -> Image.Image:
    img = Image.new("RGB", (40, 40), (30, 90, 200))
    for x in range(40):
        img.putpixel((x, (3 * x) % 40), (250, 250, 0))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_binds_loopback_by_default(loaded):
    server = make_server(ChatService(lambda: new_session(loaded)), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_page_and_health(url):
    with urllib.request.urlopen(url + "/", timeout=30) as res:
        page = res.read().decode()
        assert res.status == 200 and res.headers["Content-Type"].startswith("text/html")
    for needle in ('type="file"', "/api/chat", "/api/clear", "readAsDataURL", "Clear history"):
        assert needle in page
    with urllib.request.urlopen(url + "/api/health", timeout=30) as res:
        assert json.loads(res.read()) == {"ok": True}


def test_multi_round_image_chat_over_http(url, loaded):
    status, first = post(url + "/api/chat", {"message": "What is in the image?", "image": data_url(picture())})
    assert status == 200, first
    session = first["session"]
    status, second = post(url + "/api/chat", {"session": session, "message": "What colour is it?"})
    assert status == 200 and second["session"] == session
    local = new_session(loaded)
    local.set_image(picture())
    expected = [[q, local.ask(q)] for q in ("What is in the image?", "What colour is it?")]
    assert first["answer"] == expected[0][1] and second["history"] == expected
    status, cleared = post(url + "/api/clear", {"session": session})
    assert status == 200 and cleared["history"] == []
    status, again = post(url + "/api/chat", {"session": session, "message": "Hello?"})
    assert status == 200 and len(again["history"]) == 1


def test_bad_requests_get_clear_errors(url):
    assert post(url + "/api/chat", b"{not json")[0] == 400
    status, body = post(url + "/api/chat", {"image": data_url(picture())})
    assert status == 400 and "message" in body["error"]
    status, body = post(url + "/api/chat", {"message": "hi", "image": "data:image/png;base64,@@@"})
    assert status == 400 and "base64" in body["error"]
    status, body = post(url + "/api/chat", {"message": "hi", "image": base64.b64encode(b"not an image").decode()})
    assert status == 400 and "decoded" in body["error"]
    status, body = post(url + "/api/chat", {"message": "look <image>"})  # ordinary text, answered
    assert status == 200 and isinstance(body["answer"], str)
    assert post(url + "/api/nothing", {})[0] == 404


def test_serve_command_reports_a_busy_port(run_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(run_dir), "--port", str(port)]) == 2
    assert "mmgpt serve: error" in capsys.readouterr().err
