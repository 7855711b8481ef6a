"""`mmgpt serve`: the paper's web demo (upload an image, chat over several rounds, clear history).

Standard library only (http.server): the demo adds no dependency. One page (GET /) and a JSON API:
  POST /api/chat   {"session"?: str, "message": str, "image"?: data-URL or base64}
                   -> {"session", "answer", "history": [[question, answer], ...]}
                   An image starts a new conversation with that image (images sit in the prompt
                   header in the training template, so a conversation has its image from the start).
  POST /api/clear  {"session": str} -> {"session", "history": []}
  GET  /api/health -> {"ok": true}
Binds 127.0.0.1 unless told otherwise: the demo has no authentication. One model serves every
session, so generation is serialised by a lock. Bounded against hostile clients: session ids are
issued by the server (unguessable; an id it did not issue is refused), each client address holds
at most MAX_SESSIONS_PER_CLIENT conversations (its own oldest goes first) in a pool of
MAX_SESSIONS, a request needs an honest Content-Length within MAX_REQUEST_BYTES, sockets time out
(slow clients cannot pin threads), and at most MAX_CONNECTIONS are served at once (others get 503).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import secrets
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from PIL import Image

from mmgpt.data.images import open_rgb
from mmgpt.inference.chat import ChatSession

MAX_REQUEST_BYTES = 32 * 1024 * 1024
MAX_SESSIONS = 64  # conversations kept in all; the least recently used of a full pool goes
MAX_SESSIONS_PER_CLIENT = 4  # per client address: a client past it loses its OWN oldest one
MAX_MESSAGE_CHARS = 4000
MAX_CONNECTIONS = 32  # requests served at once; more are answered 503 at once
SOCKET_TIMEOUT_S = 30.0


class RequestError(Exception):
    """A client mistake: answered with HTTP 400 (or `status`) and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data: str) -> Image.Image:
    """A data URL (`data:image/png;base64,...`) or bare base64 -> RGB image."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"image is not valid base64: {err}") from err
    image = open_rgb(io.BytesIO(raw))  # the pixel cap is checked before anything is decoded
    if isinstance(image, str):
        raise RequestError(f"image could not be decoded: {image}")
    return image


class ChatService:
    """Sessions by server-issued id, each a ChatSession made by `new_session`, owned by the client
    address that opened it; the model is used under a lock."""

    def __init__(self, new_session: Callable[[], ChatSession]):
        self.new_session = new_session
        self.sessions: OrderedDict[str, tuple[str, ChatSession]] = OrderedDict()  # id -> (client, session)
        self.lock = threading.Lock()

    def _session(self, session_id: Any, client: str) -> tuple[str, ChatSession]:
        if session_id is not None:
            owner, session = self.sessions.get(session_id, (None, None)) if isinstance(session_id, str) \
                else (None, None)
            if session is None or owner != client:
                raise RequestError("unknown or expired session: start a new conversation (omit 'session')", 404)
            self.sessions.move_to_end(session_id)
            return session_id, session
        mine = [sid for sid, (owner, _) in self.sessions.items() if owner == client]
        if len(mine) >= MAX_SESSIONS_PER_CLIENT:
            del self.sessions[mine[0]]
        elif len(self.sessions) >= MAX_SESSIONS:
            self.sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        self.sessions[session_id] = (client, self.new_session())
        return session_id, self.sessions[session_id][1]

    def chat(self, request: dict[str, Any], client: str = "local") -> dict[str, Any]:
        message = request.get("message")
        if not isinstance(message, str) or not message.strip():
            raise RequestError("'message' must be a non-empty string")
        if len(message) > MAX_MESSAGE_CHARS:
            raise RequestError(f"'message' is over {MAX_MESSAGE_CHARS} characters")
        image = decode_image(request["image"]) if request.get("image") else None
        with self.lock:
            session_id, session = self._session(request.get("session"), client)
            if image is not None:
                session.set_image(image)
            try:
                answer = session.ask(message)
            except ValueError as err:  # the question itself (too long)
                raise RequestError(str(err)) from err
            return {"session": session_id, "answer": answer, "history": session.history()}

    def clear(self, request: dict[str, Any], client: str = "local") -> dict[str, Any]:
        with self.lock:
            session_id, session = self._session(request.get("session"), client)
            session.clear()
            return {"session": session_id, "history": []}


def make_handler(service: ChatService, timeout: float = SOCKET_TIMEOUT_S) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[..., dict[str, Any]]] = {"/api/chat": service.chat, "/api/clear": service.clear}

    class Handler(BaseHTTPRequestHandler):
        server_version = "mmgpt-demo"
        protocol_version = "HTTP/1.0"  # one request per connection: nothing idles on a socket

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict[str, Any]) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/api/health":
                self._json(200, {"ok": True})
            else:
                self._json(404, {"error": f"no such page: {self.path}"})

        def do_POST(self) -> None:
            route = routes.get(self.path)
            if route is None:
                self._json(404, {"error": f"no such endpoint: {self.path}"})
                return
            raw_length = self.headers.get("Content-Length")
            if raw_length is None:
                self._json(411, {"error": "a Content-Length header is required"})
                return
            if not raw_length.strip().isdigit():
                self._json(400, {"error": f"bad Content-Length {raw_length!r}"})
                return
            length = int(raw_length)
            if length > MAX_REQUEST_BYTES:
                self._json(413, {"error": f"request over {MAX_REQUEST_BYTES} bytes"})
                return
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                self._json(408, {"error": f"the request body did not arrive within {self.timeout} s"})
                return
            try:
                if len(body) != length:
                    raise RequestError("the request body is shorter than its Content-Length")
                request = json.loads(body or b"{}")
                if not isinstance(request, dict):
                    raise RequestError("the request body must be a JSON object")
                self._json(200, route(request, client=self.client_address[0]))
            except json.JSONDecodeError as err:
                self._json(400, {"error": f"request body is not JSON: {err}"})
            except RequestError as err:
                self._json(err.status, {"error": str(err)})
            except Exception as err:  # a failed generation answers 500; the demo keeps serving
                self._json(500, {"error": f"{type(err).__name__}: {err}"})

    Handler.timeout = timeout  # socket timeout: a client that stalls mid-request is dropped
    return Handler


class BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` requests in flight: beyond that a
    connection is answered 503 at once instead of getting a thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            finally:
                self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 7860, *,
                timeout: float = SOCKET_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> BoundedServer:
    """The demo server (not started); port 0 picks a free port (`server.server_address`)."""
    return BoundedServer((host, port), make_handler(service, timeout), max_connections)


def run(args: argparse.Namespace) -> int:
    """`mmgpt serve` (parser and path checks: mmgpt/commands/serve.py)."""
    from mmgpt.inference.chat import session_factory_from_args

    service = ChatService(session_factory_from_args(args))  # bad model dir: one line from mmgpt/cli.py
    try:
        server = make_server(service, args.host, args.port)
    except OSError as err:  # port in use, unknown address
        print(f"mmgpt serve: error: {err}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"mmgpt demo on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MultiModal-GPT demo</title>
<style>
body{font-family:sans-serif;max-width:780px;margin:2em auto;padding:0 1em}
#log{border:1px solid #ccc;min-height:240px;padding:.5em;overflow-y:auto;max-height:60vh}
.user{color:#124;margin:.4em 0}.bot{color:#241;margin:.4em 0 1em;white-space:pre-wrap}
#preview{max-width:224px;display:block;margin:.5em 0}textarea{width:100%;box-sizing:border-box}
#err{color:#a00}
</style></head><body>
<h1>MultiModal-GPT</h1>
<p>Upload an image (optional: it starts a new conversation), then ask questions over several rounds.</p>
<input type="file" id="file" accept="image/*"><img id="preview" alt="">
<div id="log"></div>
<textarea id="msg" rows="3" placeholder="Ask something about the image"></textarea>
<button id="send">Send</button> <button id="clear">Clear history</button> <span id="err"></span>
<script>
let session = null, pendingImage = null;
const $ = id => document.getElementById(id);
$('file').onchange = () => {
  const f = $('file').files[0]; if (!f) return;
  const r = new FileReader();
  r.onload = () => { pendingImage = r.result; $('preview').src = r.result; };
  r.readAsDataURL(f);
};
function show(history) {
  const log = $('log'); log.textContent = '';
  for (const [q, a] of history) {
    const u = document.createElement('div'); u.className = 'user'; u.textContent = 'You: ' + q;
    const b = document.createElement('div'); b.className = 'bot'; b.textContent = 'MMGPT: ' + a;
    log.append(u, b);
  }
  log.scrollTop = log.scrollHeight;
}
async function post(path, body) {
  const res = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                 body: JSON.stringify(body)});
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}
$('send').onclick = async () => {
  const message = $('msg').value.trim(); if (!message) return;
  $('send').disabled = true; $('err').textContent = '';
  try {
    const body = {session, message};
    if (pendingImage) body.image = pendingImage;
    const data = await post('/api/chat', body);
    session = data.session; pendingImage = null; $('msg').value = ''; show(data.history);
  } catch (e) { $('err').textContent = e.message; }
  $('send').disabled = false;
};
$('clear').onclick = async () => {
  if (session) await post('/api/clear', {session});
  show([]); $('preview').src = ''; pendingImage = null; $('file').value = '';
};
</script></body></html>
"""
