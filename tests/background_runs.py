"""The real-launcher runs, started in one background thread as soon as the tests are collected.

The launcher files (tests/test_launch.py, then tests/test_launch_paths.py) run last, but their
2-rank runs are most of the suite's CPU time. tests/conftest.py starts each file's `BACKGROUND`
job, in that order, in one thread when collection finishes, so the rest of the suite (mostly one
process at a time) runs on the core the launches leave idle. A file's module fixture then waits
for its job (and runs it itself should the hook not have started it).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

# Prefix of every launch command: the launches yield the CPU to the tests of the main thread, which
# run one process at a time, so those finish early and the launches (2 ranks each) use both cores
# for the rest (the suite's last minutes were one core busy, the other idle).
NICE = ["nice", "-n", "10"]


class Job:
    """`run(root)` on a fresh temporary directory, in the background thread or in the caller's."""

    def __init__(self, name: str, run: Callable[[Path], Any]):
        self.name = name
        self.run = run
        self.started = False
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run_in(self, root: Path) -> None:
        try:
            self.value = self.run(root)
        except BaseException as err:  # a failure or pytest.skip: re-raised in the test process by result()
            self.error = err
        finally:
            self.done.set()

    def result(self, tmp_path_factory) -> Any:
        """The job's return value (raising what it raised); runs it here if no thread started it."""
        if not self.started:
            return self.run(tmp_path_factory.mktemp(self.name))
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def start(jobs: list[Job], tmp_path_factory) -> None:
    """Run `jobs` one after another in a daemon thread (two files' runs at once would not fit in
    24 GiB)."""
    roots = [tmp_path_factory.mktemp(job.name) for job in jobs]  # pytest's factory, from the main thread
    for job in jobs:
        job.started = True

    def run_all() -> None:
        for job, root in zip(jobs, roots):
            job.run_in(root)

    threading.Thread(target=run_all, name="launcher runs", daemon=True).start()
