"""`mmgpt data inspect`: load every sample of a mixture once and report what training would see.

Per source: records read / selected / kept / dropped by reason; token lengths (min, median, p95,
max and a power-of-two histogram); the supervised-token fraction; a few rendered examples with
the supervised spans wrapped in [[ ]] so a human can check the masks by eye.
"""
from __future__ import annotations

import statistics
from typing import Any

from mmgpt.data.conversation import Conversation
from mmgpt.data.mixture import Mixture
from mmgpt.data.templates import render

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


def inspect_mixture(mixture: Mixture, show: int = 3) -> dict[str, Any]:
    """Load every sample once (filling mixture.report) and summarise; `show` rendered examples."""
    lengths: list[int] = []
    per_source: dict[str, list[int]] = {}
    supervised = 0
    examples: list[dict[str, Any]] = []
    for i in range(len(mixture)):
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
    report["lengths"] = length_stats(lengths)
    report["supervised_fraction"] = supervised / sum(lengths) if lengths else 0.0
    report["samples"] = len(mixture)
    report["examples"] = examples
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of the inspect report."""
    lines = [f"{'source':<22}{'read':>8}{'selected':>10}{'kept':>8}  dropped"]
    for name, s in report["sources"].items():
        dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"{name:<22}{s['read']:>8}{s['selected']:>10}{s['kept']:>8}  {dropped}")
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
    for ex in report["examples"]:
        lines.append(f"\n--- example {ex['index']} ({ex['origin']}, {ex['tokens']} tokens) ---")
        lines.append(ex["text"])
    return "\n".join(lines)
