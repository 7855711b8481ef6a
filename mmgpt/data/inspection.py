"""`mmgpt data inspect`: load every sample of a mixture once and report what training would see.

Per source: records read / usable / held out / selected / kept / dropped by reason, with a line
saying why fewer were selected than read (drops, the eval holdout, `sample:`, the language:VL
ratio); token lengths (min, median, p95, max and a power-of-two histogram); the supervised-token
fraction; a few rendered examples with the supervised spans wrapped in [[ ]] so a human can check
the masks by eye; the rows/steps estimate of a run (mmgpt/train/inspect_data.py) when given.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, TextIO

from mmgpt.data.conversation import Conversation
from mmgpt.data.mixture import Mixture
from mmgpt.data.templates import render


class Progress:
    """`label: 12,000/100,000 samples` lines on `stream` (stderr): every `every` samples when
    given, else every `seconds`, so a scan that ends within `seconds` prints nothing (quiet
    tests) while a long one shows it is alive. `update(done)` is cheap enough to call per sample."""

    def __init__(self, label: str, total: int, unit: str = "samples", every: int | None = None,
                 seconds: float = 2.0, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.every, self.seconds = every, seconds
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = self._last = clock()
        self.printed = 0

    def update(self, done: int) -> None:
        if self.every:
            due = done % self.every == 0 or done == self.total
        else:
            due = done == self.total and self.printed or self.clock() - self._last >= self.seconds
        if due:
            self._last = self.clock()
            self.printed += 1
            elapsed = self._last - self.start
            print(f"{self.label}: {done:,}/{self.total:,} {self.unit} ({elapsed:.1f} s)", file=self.stream, flush=True)

MARK_OPEN, MARK_CLOSE = "[[", "]]"


def length_stats(lengths: list[int]) -> dict[str, Any]:
    """min / median / p95 (nearest rank) / max, and counts per power-of-two length bucket."""
    if not lengths:
        return {"count": 0, "histogram": {}}
    ordered = sorted(lengths)
    p95 = ordered[-(-95 * len(ordered) // 100) - 1]
    histogram: dict[str, int] = {}
    for n in ordered:
        hi = 1 << max(0, (n - 1).bit_length())
        key = f"{hi // 2 + 1}-{hi}" if hi > 1 else "1"
        histogram[key] = histogram.get(key, 0) + 1
    return {
        "count": len(ordered),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": p95,
        "max": ordered[-1],
        "histogram": histogram,
    }


def mark_supervised(conv: Conversation) -> str:
    """The rendered training text with each supervised span wrapped in [[ ]]."""
    text, spans = render(conv)
    out, pos = [], 0
    for a, b in spans:
        out += [text[pos:a], MARK_OPEN, text[a:b], MARK_CLOSE]
        pos = b
    return "".join(out) + text[pos:]


def inspect_mixture(mixture: Mixture, show: int = 3, progress: Progress | None = None,
                    holdout: int | float | None = None) -> dict[str, Any]:
    """Load every sample once (filling mixture.report) and summarise; `show` rendered examples.
    `holdout`: the eval.holdout the mixture was built with (named in the selection notes)."""
    lengths: list[int] = []
    per_source: dict[str, list[int]] = {}
    supervised = 0
    examples: list[dict[str, Any]] = []
    for i in range(len(mixture)):
        if progress is not None:
            progress.update(i + 1)
        sample = mixture.load(i)
        if sample is None:
            continue
        lengths.append(len(sample))
        per_source.setdefault(sample.source, []).append(len(sample))
        supervised += sample.num_supervised
        if len(examples) < show:
            conv = mixture.conversation(i)
            examples.append({"index": i, "source": conv.source, "origin": conv.origin,
                             "tokens": len(sample), "text": mark_supervised(conv)})
    report = mixture.report.to_dict()
    for name, stats in report["sources"].items():
        stats["lengths"] = length_stats(per_source.get(name, []))
    for src in mixture.cfg.sources:
        report["sources"][src.name]["notes"] = selection_notes(report["sources"][src.name], src.sample,
                                                               mixture.cfg.language_vl_ratio, holdout)
    report["lengths"] = length_stats(lengths)
    report["supervised_fraction"] = supervised / sum(lengths) if lengths else 0.0
    report["samples"] = len(mixture)
    report["examples"] = examples
    return report


def _count(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


def selection_notes(stats: dict[str, Any], sample: int | None, ratio: float | None,
                    holdout: int | float | None) -> list[str]:
    """Why a source's `selected` (and `kept`) is below its `read`, step by step, each step naming
    the setting that did it: drops before sampling, the eval holdout, `sample:`, the ratio, drops
    at load. Empty when every record read was kept."""
    notes = []
    built = {k: v - stats["dropped_at_load"].get(k, 0) for k, v in stats["dropped"].items()}
    built = {k: v for k, v in built.items() if v}
    if built:
        notes.append(f"{sum(built.values())} record(s) unusable before sampling ({_count(built)}): "
                     f"{stats['usable']} usable of {stats['read']} read")
    elif stats["usable"] != stats["read"]:
        notes.append(f"{stats['read']} record(s) read make {stats['usable']} conversations (the reader's options)")
    available = stats["usable"] - stats["held_out"]
    if stats["held_out"]:
        notes.append(f"{stats['held_out']} held out for evaluation (eval.holdout: {holdout}), never trained on: "
                     f"{available} left")
    sampled = available if sample is None else min(sample, available)
    if sampled < available:
        notes.append(f"sampling (sample: {sample}) draws {sampled} of the {available} available")
    if stats["selected"] < sampled:
        notes.append(f"language_vl_ratio: {ratio} subsamples this side: {stats['selected']} of {sampled} selected")
    elif stats["selected"] > sampled:  # cannot happen today; say so rather than explain it wrongly
        notes.append(f"{stats['selected']} selected > {sampled} after sampling (unexpected)")
    if stats["kept"] < stats["selected"] and stats["dropped_at_load"]:
        notes.append(f"{stats['selected'] - stats['kept']} selected record(s) dropped at load "
                     f"({_count(stats['dropped_at_load'])})")
    return notes


def format_estimate(est: dict[str, Any]) -> list[str]:
    lines = [
        f"\nestimate per epoch (world size {est['world_size']}, --world-size to change; "
        f"max_tokens {est['max_tokens']}, rows_per_batch {est['rows_per_batch']}, grad_accum {est['grad_accum']}):",
        f"  packed rows: {est['rows_per_epoch']:,} ({est['samples_per_epoch']:,} samples); "
        f"micro-batches per rank: {', '.join(f'{b:,}' for b in est['micro_batches_per_rank'])}",
        f"  optimizer steps: {est['steps_per_epoch']:,}  ({est['formula']})",
    ]
    if est["max_steps"]:
        lines.append(f"  the run: schedule.max_steps {est['max_steps']:,} steps")
    else:
        lines.append(f"  the run: {est['total_steps']:,} steps ({est['epochs']} epoch(s))")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of the inspect report."""
    lines = [f"{'source':<22}{'read':>8}{'usable':>8}{'held_out':>10}{'selected':>10}{'kept':>8}  dropped"]
    for name, s in report["sources"].items():
        dropped = _count(s["dropped"]) or "-"
        lines.append(f"{name:<22}{s['read']:>8}{s['usable']:>8}{s['held_out']:>10}{s['selected']:>10}"
                     f"{s['kept']:>8}  {dropped}")
    for name, s in report["sources"].items():
        for note in s.get("notes", []):
            lines.append(f"  [{name}] {note}")
    lengths = report["lengths"]
    if lengths["count"]:
        lines.append(
            f"\ntokens per sample: min {lengths['min']}  median {lengths['median']}  "
            f"p95 {lengths['p95']}  max {lengths['max']}  ({lengths['count']} samples)"
        )
        lines.append("histogram: " + "  ".join(f"{k}:{v}" for k, v in lengths["histogram"].items()))
    lines.append(f"supervised-token fraction: {report['supervised_fraction']:.3f}")
    for name, s in report["sources"].items():
        for message in s["errors"][:3]:
            lines.append(f"  [{name}] {message}")
    if report.get("estimate"):
        lines += format_estimate(report["estimate"])
    for ex in report["examples"]:
        lines.append(f"\n--- example {ex['index']} ({ex['origin']}, {ex['tokens']} tokens) ---")
        lines.append(ex["text"])
    return "\n".join(lines)
