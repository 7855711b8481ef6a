"""Shared fixtures: CPU-only, deterministic, small; and the skip policy.

Every skip must name one of SKIP_REASONS (its reason starts with the key). Under CI=true only
CUDA-only tests may skip: a missing browser, Java, deepspeed or the shared real samples fails the
run instead, so CI can never pass with a feature's tests silently not run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent
REAL_SAMPLES = Path(os.environ.get("MMGPT_REAL_SAMPLES", REPO.parent / "shared" / "real-samples"))
IN_CI = os.environ.get("CI") == "true"

SKIP_REASONS = {  # reason prefix -> when it happens (the README's testing section lists these)
    "needs CUDA": "CUDA-only kernel parametrisations, on a machine without a GPU (allowed in CI)",
    "needs a browser": "the web demo's headless-browser test without chromium/playwright-core",
    "needs Java": "the COCO caption metrics without a Java runtime",
    "needs deepspeed": "the multi-rank launcher tests without the deepspeed launcher",
    "needs sshd, pdsh and slurm": "the pdsh and Slurm launch-path tests without openssh-server, pdsh, "
                                  "slurm-wlm and munge (bash tests/launch/install.sh)",
    "needs the shared real samples": "the real-format reader tests outside this project's workspace",
    "needs lmms-eval": "the lmms-eval integration test without lmms-eval importable or MMGPT_LMMS_PYTHON "
                       "(.ci/run makes that venv)",
}
CI_ALLOWED_SKIPS = ("needs CUDA",)


@pytest.fixture(scope="session")
def real_samples() -> Path:
    if not REAL_SAMPLES.is_dir():
        pytest.skip(f"needs the shared real samples: not found at {REAL_SAMPLES}")
    return REAL_SAMPLES


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Turn a skip into a failure when its reason is not in SKIP_REASONS, or not allowed in CI."""
    report = (yield).get_result()
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    known = next((key for key in SKIP_REASONS if reason.startswith(key)), None)
    if known is None or (IN_CI and known not in CI_ALLOWED_SKIPS):
        why = "is not one of tests/conftest.py's SKIP_REASONS" if known is None else "is not allowed under CI=true"
        report.outcome = "failed"
        report.longrepr = f"skip {why}: {reason}"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from mmgpt.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    return load_tokenizer(TINY_TOKENIZER_DIR)


# The real-launcher tests (about 5 minutes of 2-rank runs on 2 cores) run last, and their runs start
# in a background thread as soon as the tests are collected (tests/background_runs.py): the rest of
# the suite, mostly one process at a time, uses the CPU the launches leave idle. test_launch_paths.py
# stays after test_launch.py: its pdsh stop (run by its fixture, not in the thread) kills every
# launch.py of the user, so nothing may launch beside it.
LAUNCH_FILES = ("test_launch.py", "test_launch_paths.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LAUNCH_FILES.index(item.path.name) + 1 if item.path.name in LAUNCH_FILES else 0)


def pytest_collection_finish(session):
    modules = {item.path.name: item.module for item in session.items if item.path.name in LAUNCH_FILES}
    if modules and shutil.which("deepspeed") and not session.config.option.collectonly:
        from background_runs import start

        start([modules[name].BACKGROUND for name in LAUNCH_FILES if name in modules],
              session.config._tmp_path_factory)


def pytest_sessionfinish(session, exitstatus):
    """A session stopped early (-x, Ctrl-C) leaves no background launch running."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
