"""`mmgpt serve` end to end in a headless browser: the gradio page (launched on loopback in this
module) is driven like a person would (upload an image through the file input, type a question
and click Send, click an example prompt and Send, move the max_new_tokens slider, ask again,
click Clear, ask once more) by tests/browser/demo_e2e.js (playwright-core driving the system
chromium). The answers shown must equal a local ChatSession's for the same image, questions and
settings (greedy decoding, so deterministic); each answer must have been shown part-way (a strict
prefix) before it was complete, i.e. streamed — generation is slowed here (a sleep per token, in
this test only) so that the tiny model's answers take long enough to watch. Every request the
page makes must go to 127.0.0.1. With MMGPT_WRITE_SCREENSHOTS=1 the screenshot is also written
to docs/web_demo.png (the README's picture). Skipped where the browser or the npm package is not
installed: run tests/browser/install.sh first (CI does)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image, ImageDraw
from test_serve import DEFAULTS, launched, loaded, run_dir  # noqa: F401 (fixtures)

from mmgpt.inference.chat import ChatSession

BROWSER_DIR = Path(__file__).parent / "browser"
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web_demo.png"
CHROMIUM = Path("/usr/bin/chromium")
TOKEN_DELAY_S = 0.1
PLAN = {"typed": "What is in the image?", "example": "Tell me more.", "afterSlider": "Is it big?",
        "sliderValue": 2, "afterClear": "Hello?", "refused": "And now?"}

_missing = [why for ok, why in (
    (CHROMIUM.exists(), f"{CHROMIUM} is missing"),
    ((BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), "tests/browser/node_modules is missing"),
    (shutil.which("node") is not None, "node is not on PATH"),
) if not ok]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason="needs a browser: run tests/browser/install.sh (" + "; ".join(_missing) + ")")


def scene() -> Image.Image:
    """A picture big enough to make out in the screenshot: a sky, a sun, a hill."""
    img = Image.new("RGB", (224, 224), (120, 180, 235))
    draw = ImageDraw.Draw(img)
    draw.ellipse((150, 24, 194, 68), fill=(250, 210, 40))
    draw.polygon([(0, 224), (0, 150), (90, 110), (224, 170), (224, 224)], fill=(60, 140, 70))
    return img


class SleepyStreamer:
    """Hands each token on to `inner` after a pause: the answer takes long enough to be seen
    streaming in the page."""

    def __init__(self, inner):
        self.inner = inner

    def put(self, value):
        time.sleep(TOKEN_DELAY_S)
        self.inner.put(value)

    def end(self):
        self.inner.end()


class SlowSession(ChatSession):
    def ask(self, question, streamer=None):
        return super().ask(question, streamer=SleepyStreamer(streamer) if streamer is not None else None)


@pytest.fixture(scope="module")
def slow_app(loaded):  # noqa: F811 (the fixture imported above)
    demo, url = launched(lambda: SlowSession(loaded, DEFAULTS))
    yield url
    demo.close()


def drive_page(url: str, image: Path, screenshot: Path) -> dict:
    proc = subprocess.run(
        ["node", str(BROWSER_DIR / "demo_e2e.js"), url, str(image), str(screenshot), json.dumps(PLAN)],
        cwd=BROWSER_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"browser driver failed:\n{proc.stderr}\n{proc.stdout}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_rounds(loaded) -> tuple[list[list[str]], list[str]]:  # noqa: F811
    """The local session's answers for PLAN: (the image conversation, the one after Clear)."""
    local = ChatSession(loaded, DEFAULTS)
    local.set_image(scene())
    qa = [[q, local.ask(q)] for q in (PLAN["typed"], PLAN["example"])]
    local.generation = replace(DEFAULTS, max_new_tokens=PLAN["sliderValue"])
    qa.append([PLAN["afterSlider"], local.ask(PLAN["afterSlider"])])
    fresh = ChatSession(loaded, replace(DEFAULTS, max_new_tokens=PLAN["sliderValue"]))
    return qa, [PLAN["afterClear"], fresh.ask(PLAN["afterClear"])]


def test_demo_in_a_headless_browser(slow_app, loaded, tmp_path):  # noqa: F811
    image = tmp_path / "picture.png"
    scene().save(image)
    screenshot = tmp_path / "web_demo.png"
    got = drive_page(slow_app, image, screenshot)
    print("browser timings (ms):", got["timings"])
    qa, after_clear = expected_rounds(loaded)

    # The slider had teeth: the third answer under the default max_new_tokens would differ.
    unchanged = ChatSession(loaded, DEFAULTS)
    unchanged.set_image(scene())
    for q, _ in qa:
        unchanged_answer = unchanged.ask(q)
    assert unchanged_answer != qa[2][1]

    assert got["title"] == "MultiModal-GPT demo"
    assert got["pageErrors"] == [] and got["consoleErrors"] == []
    # The page aborts its own event streams (queue/data, heartbeat) when it is done with them.
    assert [f for f in got["failedRequests"] if not (f["error"] == "net::ERR_ABORTED" and urlsplit(f["url"]).path in
            ("/gradio_api/queue/data", f"/gradio_api/heartbeat/{urlsplit(f['url']).path.rsplit('/', 1)[-1]}"))] == []
    # Loopback only: no font, script, analytics or version check from anywhere else.
    assert got["requests"] and {urlsplit(u).hostname for u in got["requests"]} == {"127.0.0.1"}

    assert got["afterUpload"] == [{"role": "user", "text": "<image>"}]
    assert got["slider"] == {"range": str(PLAN["sliderValue"]), "number": str(PLAN["sliderValue"])}
    assert [r["typed"] for r in got["rounds"]] == [PLAN["typed"], PLAN["example"], PLAN["afterSlider"],
                                                  PLAN["afterClear"]]  # the example filled the box
    for n, shown in enumerate(got["rounds"][:3], start=1):
        assert shown["shown"] == [{"role": "user", "text": "<image>"}] + [
            {"role": role, "text": text} for q, a in qa[:n] for role, text in (("user", q), ("bot", a))]
        assert shown["errors"] == []
    for n, (shown, (_, answer)) in enumerate(zip(got["rounds"], qa + [after_clear])):
        streamed = shown["streamed"]  # every text the answer's bubble showed, in order
        assert streamed[-1] == answer and all(answer.startswith(text) for text in streamed), streamed
        if n < 2:  # the two full-length rounds were seen part-way
            assert any(text and text != answer for text in streamed), f"not streamed: {streamed}"

    # Clear emptied the chat, the image and the box; the next question starts over.
    assert got["afterClear"] == {"shown": [], "imageShown": 0, "message": ""}
    assert got["rounds"][3]["shown"] == [{"role": "user", "text": after_clear[0]},
                                         {"role": "bot", "text": after_clear[1]}]

    # num_beams 2 with do_sample: a visible error, and the conversation as it was.
    refused = got["refused"]
    assert (refused["numBeams"], refused["doSample"]) == ("2", True)
    assert len(refused["toasts"]) == 1 and "not both" in refused["toasts"][0], refused["toasts"]
    assert refused["shown"] == got["rounds"][3]["shown"]

    png = screenshot.read_bytes()
    assert len(png) > 10_000 and png.startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("MMGPT_WRITE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT.write_bytes(png)
