"""Stopping every rank together on SIGTERM / SIGINT, or when the launcher is gone.

The preemption pattern of Slurm and Kubernetes is SIGTERM, a grace period, then SIGKILL. While
`stop_on_signals` is active (the training loop), SIGTERM and SIGINT only set a flag; the loop
adds the flag to the all-reduce every step already makes (`WindowStats.totals`), so a signal to
ANY rank stops ALL ranks after the same step. They then save one verified checkpoint together
and exit with 143 (mmgpt/cli/train.py's EXIT_STOPPED); `--resume auto` continues from it exactly.
Repeated signals change nothing (a Ctrl-C reaches every rank twice: from the terminal and from
DeepSpeed's launch.py); SIGKILL remains the way out.

Why the launcher is watched: on one node, `deepspeed` (deepspeed/launcher/runner.py) starts
launch.py with Popen and installs no signal handler, so SIGTERM to `deepspeed` ends only that
process while launch.py and the ranks train on, orphaned. No process can be told of its
grandparent's death, so each rank polls the processes above it once a second and treats their
disappearance as a stop request.

What bounds the grace period: DeepSpeed's launch.py, when signalled or when a rank fails,
SIGTERMs each rank and SIGKILLs what is left 30 s later; Slurm's KillWait does the same. A step
plus a save must fit in that; a save cut short leaves `latest` on the previous checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import psutil

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 1.0


class StopRequest:
    """Why this rank was asked to stop (None: it was not). Set from signal handlers and a thread;
    a single assignment, read by the loop once per step."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


def launcher_processes() -> list[psutil.Process]:
    """DeepSpeed's launch.py (this rank's parent) and the process that started it (`deepspeed`,
    or pdsh's remote shell); empty when this rank was not started by launch.py."""
    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return []
        grandparent = parent.parent()
    except psutil.Error:
        return []
    return [parent] + ([grandparent] if grandparent is not None and grandparent.pid > 1 else [])


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(processes: list[psutil.Process], request: StopRequest, done: threading.Event) -> None:
    while not done.wait(POLL_S):
        gone = [p.pid for p in processes if not _alive(p)]
        if gone:
            request.request(f"the launcher process {gone[0]} exited")
            return


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM/SIGINT and the launcher's exit set the yielded StopRequest
    (main thread only); the previous handlers are back afterwards."""
    request = StopRequest()

    def handler(signum: int, frame) -> None:
        request.request(f"{signal.Signals(signum).name} received")

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    done = threading.Event()
    watched = launcher_processes()
    watcher = threading.Thread(target=_watch, args=(watched, request, done), daemon=True, name="launcher-watch")
    if watched:
        watcher.start()
    try:
        yield request
    finally:
        done.set()
        for sig, old in previous.items():
            signal.signal(sig, old)
