"""`mmgpt serve`: real HTTP requests on loopback (server on port 0 in a thread): the page, a
multi-round image chat whose answers equal a local ChatSession's, clear history, bad requests.
The page itself is driven in a headless browser by tests/test_serve_browser.py."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image
from test_export import make_run

from mmgpt.cli import build_parser, main
from mmgpt.inference.chat import ChatSession
from mmgpt.inference.generation import GenerationConfig
from mmgpt.inference.model_dir import load_model, resolve_source
from mmgpt.inference import serve as serve_mod
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


def raw_request(url: str, head: bytes, body: bytes = b"", timeout: float = 30) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_content_length_must_be_honest(url):
    """Negative, absent, non-numeric or over-size Content-Length never reaches the JSON parser."""
    body = json.dumps({"message": "hi"}).encode()
    for header, status in ((b"Content-Length: -1\r\n", b"400"), (b"", b"411"), (b"Content-Length: 1e9\r\n", b"400"),
                           (b"Content-Length: 48000000\r\n", b"413")):
        reply = raw_request(url, b"POST /api/chat HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n", body)
        assert reply.split(b" ", 2)[1] == status, reply[:200]


def test_session_ids_are_issued_by_the_server_and_unguessable(url):
    status, forged = post(url + "/api/chat", {"session": "my-own-id", "message": "hi"})
    assert status == 404 and "unknown or expired session" in forged["error"]
    ids = {post(url + "/api/chat", {"message": "hi"})[1]["session"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) >= 40 for i in ids)  # 32 random bytes, url-safe base64


def test_one_client_cannot_evict_another_clients_conversation(loaded):
    service = ChatService(lambda: new_session(loaded))
    victim = service.clear({}, client="10.0.0.1")["session"]
    for _ in range(3 * serve_mod.MAX_SESSIONS):  # a flood of new conversations from one address
        service.clear({}, client="10.0.0.2")
    assert service.clear({"session": victim}, client="10.0.0.1")["session"] == victim
    assert sum(owner == "10.0.0.2" for owner, _ in service.sessions.values()) == serve_mod.MAX_SESSIONS_PER_CLIENT
    with pytest.raises(serve_mod.RequestError, match="unknown or expired"):  # nor use it
        service.clear({"session": victim}, client="10.0.0.2")


def test_slow_clients_time_out_and_connections_are_bounded(loaded):
    server = make_server(ChatService(lambda: new_session(loaded)), port=0, timeout=0.5, max_connections=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        slow = [socket.create_connection((host, port), timeout=10) for _ in range(2)]
        for sock in slow:
            sock.sendall(b"POST /api/chat HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # then stall
        extra = socket.create_connection((host, port), timeout=10)
        extra.sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
        assert extra.recv(100).startswith(b"HTTP/1.0 503")  # both slots are taken: refused at once
        extra.close()
        for sock in slow:  # the stalled requests are answered 408 after the socket timeout
            assert sock.recv(100).startswith(b"HTTP/1.0 408")
            sock.close()
        for _ in range(50):  # the slots are free again (a handler thread releases its slot as it ends)
            try:
                status = urllib.request.urlopen(f"http://{host}:{port}/api/health", timeout=10).status
                break
            except urllib.error.HTTPError as err:
                assert err.code == 503
                time.sleep(0.1)
        assert status == 200
        assert threading.active_count() < 20
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
