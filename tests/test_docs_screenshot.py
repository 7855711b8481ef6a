"""docs/screenshots/tensorboard.sh (which wrote docs/tensorboard.png) plans the right steps: it
trains the demo only when the run has no TensorBoard events, then starts TensorBoard on a free
local port and drives the screenshot. `--dry-run` prints the steps and runs nothing (cheap: the
real run trains or at least starts TensorBoard and chromium)."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "docs" / "screenshots" / "tensorboard.sh"


def dry_run(*args: str) -> list[str]:
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_dry_run_trains_only_a_run_without_events(tmp_path):
    fresh = dry_run(str(tmp_path / "new"), str(tmp_path / "shot.png"))
    assert fresh[0] == f"+ bash {REPO}/launch/demo.sh {tmp_path / 'new'}"
    (tmp_path / "old" / "tensorboard").mkdir(parents=True)
    (tmp_path / "old" / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    done = dry_run(str(tmp_path / "old"), str(tmp_path / "shot.png"))
    assert not any("demo.sh" in line for line in done)
    assert done[0].startswith(f"+ tensorboard --logdir {tmp_path / 'old'}/tensorboard --host 127.0.0.1 --port ")
    assert done[1].startswith(f"+ node {REPO}/tests/browser/tensorboard_shot.js http://127.0.0.1:")
    assert "eval/loss" in done[1] and str(tmp_path / "shot.png") in done[1]


def test_the_screenshot_is_committed():
    png = REPO / "docs" / "tensorboard.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "docs/tensorboard.png" in (REPO / "README.md").read_text() and "docs/screenshots/tensorboard.sh" in (
        REPO / "README.md").read_text()
