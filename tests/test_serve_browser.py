"""`mmgpt serve` end to end in a headless browser: the real page (served on loopback from a thread)
is driven like a person would (upload an image through the file input, type, click Send, wait for
the answer, click "Clear history") by tests/browser/serve_e2e.js (playwright-core driving the
system chromium). The answers shown must equal a local ChatSession's for the same image and
questions (greedy decoding, so deterministic). Skipped where the browser or the npm package is not
installed: run tests/browser/install.sh first (CI does)."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_serve import loaded, new_session, picture, post, run_dir, url  # noqa: F401 (fixtures)

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = Path("/usr/bin/chromium")
QUESTIONS = ["What is in the image?", "What colour is it?"]

_missing = [why for ok, why in (
    (CHROMIUM.exists(), f"{CHROMIUM} is missing"),
    ((BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), "tests/browser/node_modules is missing"),
    (shutil.which("node") is not None, "node is not on PATH"),
) if not ok]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason="needs a browser: run tests/browser/install.sh (" + "; ".join(_missing) + ")")


def drive_page(url: str, image: Path, screenshot: Path) -> dict:
    proc = subprocess.run(
        ["node", str(BROWSER_DIR / "serve_e2e.js"), url, str(image), str(screenshot), json.dumps(QUESTIONS)],
        cwd=BROWSER_DIR, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"browser driver failed:\n{proc.stderr}\n{proc.stdout}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_page_in_a_headless_browser(url, loaded, tmp_path):
    image = tmp_path / "picture.png"
    picture().save(image)
    screenshot = tmp_path / "page.png"
    got = drive_page(url, image, screenshot)

    local = new_session(loaded)
    local.set_image(picture())
    expected = [[q, local.ask(q)] for q in QUESTIONS]
    blind = new_session(loaded)  # the check has teeth: without the image the tiny model answers otherwise
    assert [[q, blind.ask(q)] for q in QUESTIONS] != expected

    assert got["title"] == "MultiModal-GPT demo"
    assert got["pageErrors"] == []
    # The browser's own favicon request gets the server's 404; any other console error fails.
    assert [e for e in got["consoleErrors"] if not e["url"].endswith("/favicon.ico")] == []
    # The uploaded file went to the API as a data URL of the same bytes, only with the first question.
    first, second = got["chatRequests"]
    assert isinstance(first["image"], str), "the page sent no image with the first question"
    header, payload = first["image"].split(",", 1)
    assert header == "data:image/png;base64" and base64.b64decode(payload) == image.read_bytes()
    assert first["session"] is None and second["image"] is None
    session = got["chatResponses"][0]["body"]["session"]
    assert second["session"] == session
    assert [r["status"] for r in got["chatResponses"]] == [200, 200]
    assert got["chatResponses"][-1]["body"]["history"] == expected
    # What the page shows, round by round, is the local session's answers.
    for n, shown in enumerate(got["rounds"], start=1):
        assert shown["users"] == [f"You: {q}" for q, _ in expected[:n]]
        assert shown["bots"] == [f"MMGPT: {a}" for _, a in expected[:n]]
        assert shown["msgAfter"] == "" and shown["error"] == ""

    png = screenshot.read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")

    # "Clear history" emptied the page and the server's conversation (and dropped the image).
    assert got["clearResponse"] == {"status": 200, "body": {"session": session, "history": []}}
    assert got["afterClear"] == {"logChildren": 0, "logText": "", "fileValue": "", "previewSrc": ""}
    status, again = post(url + "/api/chat", {"session": session, "message": "Hello?"})
    assert status == 200 and [q for q, _ in again["history"]] == ["Hello?"]
