"""bench/gpu.sh and the step matrix it runs, checked on the CPU (the GPU run itself is manual)."""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from mmgpt.benchmarks.packing import run_step_matrix
from mmgpt.commands import bench

REPO = Path(__file__).resolve().parent.parent


def test_gpu_script_dry_run_prints_every_command():
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    commands = [line for line in out.splitlines() if line.startswith("+ ")]
    assert len(commands) == 4, out
    matrix, train = commands[2], commands[3]
    assert "bench packing --matrix --preset 9b --device cuda --dtype bfloat16" in matrix
    assert "--max-tokens 4096" in matrix and "--json bench/results/" in matrix
    assert "bench train --preset 9b --steps 10 --json bench/results/" in train
    assert not list((REPO / "bench" / "results").glob("no-gpu.*"))  # a dry run writes nothing


def test_step_matrix_covers_backend_checkpointing_liger_on_cpu():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "packing", "--matrix", "--preset", "tiny", "--samples", "30",
                              "--max-tokens", "128", "--steps", "1"])
    result = run_step_matrix(args)
    combos = {(e["attn_backend"], e["gradient_checkpointing"], e["liger"]) for e in result["matrix"]}
    assert combos == {(b, c, liger) for b in ("sdpa", "fused") for c in ("full", "off")
                      for liger in (False, True)}
    for entry in result["matrix"]:
        # on the CPU "fused" falls back to the portable kernel, and the JSON says so
        assert entry["backends_ran"] == {"self_attention": "sdpa", "cross_attention": "sdpa"}
        assert entry["supervised_tokens_per_s"] > 0 and "error" not in entry
        assert not entry["liger_applied"]
        assert (entry["liger_note"] is None) == (not entry["liger"])
    assert "needs CUDA" in result["matrix"][-1]["liger_note"]
    # the same rows and weights in every combination: the loss does not depend on the kernels
    losses = [e["loss_sum"] for e in result["matrix"]]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])
