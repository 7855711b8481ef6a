"""`mmgpt serve`: the paper's web demo (upload an image, chat over several rounds, clear history).

Standard library only (http.server): the demo adds no dependency. One page (GET /) and a JSON API:
  POST /api/chat   {"session"?: str, "message": str, "image"?: data-URL or base64}
                   -> {"session", "answer", "history": [[question, answer], ...]}
                   An image starts a new conversation with that image (images sit in the prompt
                   header in the training template, so a conversation has its image from the start).
  POST /api/clear  {"session": str} -> {"session", "history": []}
  GET  /api/health -> {"ok": true}
Binds 127.0.0.1 unless told otherwise: the demo has no authentication. One model serves every
session, so generation is serialised by a lock.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import threading
import uuid
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from PIL import Image

from mmgpt.data.images import open_rgb
from mmgpt.inference.chat import ChatSession

MAX_REQUEST_BYTES = 32 * 1024 * 1024
MAX_SESSIONS = 64  # least recently used conversations beyond this are forgotten


class RequestError(Exception):
    """A client mistake: answered with HTTP 400 and the message."""


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
    """Sessions by id, each a ChatSession made by `new_session`; the model is used under a lock."""

    def __init__(self, new_session: Callable[[], ChatSession]):
        self.new_session = new_session
        self.sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self.lock = threading.Lock()

    def _session(self, session_id: str | None) -> tuple[str, ChatSession]:
        if session_id and session_id in self.sessions:
            self.sessions.move_to_end(session_id)
            return session_id, self.sessions[session_id]
        session_id = session_id or uuid.uuid4().hex
        self.sessions[session_id] = self.new_session()
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session_id, self.sessions[session_id]

    def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        message = request.get("message")
        if not isinstance(message, str) or not message.strip():
            raise RequestError("'message' must be a non-empty string")
        image = decode_image(request["image"]) if request.get("image") else None
        with self.lock:
            session_id, session = self._session(request.get("session"))
            if image is not None:
                session.set_image(image)
            try:
                answer = session.ask(message)
            except ValueError as err:  # the question itself (special tokens, too long)
                raise RequestError(str(err)) from err
            return {"session": session_id, "answer": answer, "history": session.history()}

    def clear(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            session_id, session = self._session(request.get("session"))
            session.clear()
            return {"session": session_id, "history": []}


def make_handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "/api/chat": service.chat, "/api/clear": service.clear}

    class Handler(BaseHTTPRequestHandler):
        server_version = "mmgpt-demo"

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
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_REQUEST_BYTES:
                self._json(413, {"error": f"request over {MAX_REQUEST_BYTES} bytes"})
                return
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise RequestError("the request body must be a JSON object")
                self._json(200, route(request))
            except json.JSONDecodeError as err:
                self._json(400, {"error": f"request body is not JSON: {err}"})
            except RequestError as err:
                self._json(400, {"error": str(err)})
            except Exception as err:  # a failed generation answers 500; the demo keeps serving
                self._json(500, {"error": f"{type(err).__name__}: {err}"})

    return Handler


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The demo server (not started); port 0 picks a free port (`server.server_address`)."""
    return ThreadingHTTPServer((host, port), make_handler(service))


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
