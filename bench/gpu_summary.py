"""bench/gpu.sh's JSON: every step's outcome (a failed step is recorded, never fatal) and the memory
plan's prediction next to the peaks the same run measured.

    python3 bench/gpu_summary.py STEPS_TSV PREFIX CARD OUT_JSON

STEPS_TSV has one line per step that gpu.sh ran or skipped: name, exit status (or `skipped`),
seconds, log path, command, tab-separated. PREFIX is the run's result prefix
(bench/results/<card>_): its step_matrix / train / plan JSON are read when present.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")


def pytest_counts(log: Path) -> dict[str, int] | None:
    """Counts from pytest's last summary line in `log` (`3 passed, 1 skipped in 2.0s`), else None."""
    if not log.is_file():
        return None
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if PYTEST_COUNTS.search(ln)
             and re.search(r" in [\d.]+s", ln)]
    if not lines:
        return None
    return {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
            for n, kind in PYTEST_COUNTS.findall(lines[-1])}


def read_steps(tsv: Path) -> list[dict[str, Any]]:
    steps = []
    for line in tsv.read_text().splitlines():
        name, rc, seconds, log, command = line.split("\t", 4)
        status = "skipped" if rc == "skipped" else ("ok" if rc == "0" else
                                                    "timeout" if rc in ("124", "137") else "failed")
        step = {"name": name, "status": status, "exit_status": None if rc == "skipped" else int(rc),
                "seconds": float(seconds), "log": log, "command": command}
        counts = pytest_counts(Path(log))
        if counts is not None:
            step["tests"] = counts
        steps.append(step)
    return steps


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _plan_modes(plan: Any, path: str = "") -> list[dict[str, Any]]:
    """Every entry of `mmgpt plan`'s JSON that holds a `peak_gib` (one per checkpointing mode),
    with where it sits, so the comparison does not hard-code the plan's layout."""
    if isinstance(plan, list):
        return [m for i, v in enumerate(plan) for m in _plan_modes(v, f"{path}[{i}]")]
    if not isinstance(plan, dict):
        return []
    found = [{"where": path or ".", "peak_gib": plan["peak_gib"], "fits": plan.get("fits")}] \
        if "peak_gib" in plan else []
    return found + [m for k, v in plan.items() for m in _plan_modes(v, f"{path}.{k}")]


def plan_vs_measured(prefix: str) -> dict[str, Any]:
    """The plan's per-mode peaks beside the step matrix's measured peaks (liger off) and bench
    train's (ZeRO-2 with its optimizer)."""
    plan = _load(Path(f"{prefix}plan.json"))
    matrix = _load(Path(f"{prefix}step_matrix.json")) or {}
    train = _load(Path(f"{prefix}train.json")) or {}
    measured = [{"source": f"step matrix: {e['attn_backend']} backend, checkpointing "
                           f"{e['gradient_checkpointing']}, {matrix.get('max_tokens')}-token rows",
                 "checkpointing": e["gradient_checkpointing"], "peak_gib": e.get("peak_memory_gib"),
                 "error": e.get("error")}
                for e in matrix.get("matrix", []) if not e.get("liger")]
    if train:
        measured.append({"source": "bench train (ZeRO-2, optimizer)", "peak_gib": train.get("peak_memory_gib")})
    return {"plan": _plan_modes(plan) if plan is not None else None, "measured": measured}


def main(argv: list[str]) -> int:
    tsv, prefix, card, out = argv
    steps = read_steps(Path(tsv))
    summary = {"card": card, "steps": steps,
               "failed_steps": [s["name"] for s in steps if s["status"] not in ("ok", "skipped")],
               "plan_vs_measured": plan_vs_measured(prefix)}
    Path(out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
