"""The skip policy (tests/conftest.py): in CI a feature's tests cannot silently not run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _pytest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_missing_real_samples_fail_under_ci_and_skip_with_a_reason_elsewhere(tmp_path):
    hidden = {"MMGPT_REAL_SAMPLES": str(tmp_path / "absent")}
    target = str(TESTS / "test_readers.py::test_record_counts")
    outside = _pytest({**hidden, "CI": ""}, "-rs", target)
    assert outside.returncode == 0 and "needs the shared real samples" in outside.stdout
    in_ci = _pytest({**hidden, "CI": "true"}, target)
    assert in_ci.returncode != 0 and "is not allowed under CI=true" in in_ci.stdout


def test_an_unlisted_skip_reason_fails(tmp_path):
    probe = TESTS / f"test_zz_probe_{os.getpid()}.py"  # inside tests/ so conftest.py applies
    probe.write_text("import pytest\n\ndef test_probe():\n    pytest.skip('some undocumented reason')\n")
    try:
        run = _pytest({"CI": ""}, str(probe))
    finally:
        probe.unlink()
    assert run.returncode != 0 and "is not one of tests/conftest.py's SKIP_REASONS" in run.stdout
