"""bench/gpu.sh and the step matrix it runs, checked on the CPU (the GPU run itself is manual)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mmgpt.benchmarks.packing import PackingBenchOptions, run_step_matrix
from mmgpt.cli import bench, options

REPO = Path(__file__).resolve().parent.parent


def _gpu_sh(*args: str, results: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"MMGPT_GPU_RESULTS": str(results)} if results else {})}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)


def test_gpu_script_dry_run_prints_every_step():
    out = _gpu_sh("--dry-run").stdout
    steps = dict(re.findall(r"^\+ \[(\w+)\] (.*)$", out, re.M))
    assert list(steps) == ["gpu_info", "versions", "fake_cuda", "cuda_tests", "step_matrix", "train",
                           "plan"], out
    assert steps["fake_cuda"].startswith("python3 -m pytest -q -rs tests/test_fake_cuda.py")
    assert "tests/test_kernels.py" in steps["cuda_tests"] and "_on_cuda" in steps["cuda_tests"]
    matrix = steps["step_matrix"]
    assert "bench packing --matrix --preset 9b --device cuda --dtype bfloat16" in matrix
    assert "--max-tokens 4096" in matrix and "--json bench/results/no-gpu_step_matrix.json" in matrix
    assert "bench train --preset 9b --steps 10 --json bench/results/no-gpu_train.json" in steps["train"]
    assert steps["plan"].startswith("python3 -m mmgpt.cli plan --config configs/mmgpt_9b.yaml --world-size 1")
    assert "--json bench/results/no-gpu_plan.json" in steps["plan"]
    assert not list((REPO / "bench" / "results").glob("no-gpu*"))  # a dry run writes nothing


def test_gpu_script_records_a_failed_step_and_goes_on(tmp_path):
    """Without nvidia-smi the first step fails: the summary JSON says so, the script exits 1."""
    result = _gpu_sh("--steps", "gpu_info", results=tmp_path)
    has_smi = shutil.which("nvidia-smi") is not None
    assert result.returncode == (0 if has_smi else 1), result.stderr
    card = "*" if has_smi else "no-gpu"
    (summary_path,) = tmp_path.glob(f"{card}_summary.json")
    summary = json.loads(summary_path.read_text())
    (step,) = summary["steps"]
    assert step["name"] == "gpu_info" and step["command"].startswith("nvidia-smi")
    assert step["status"] == ("ok" if has_smi else "failed") and step["exit_status"] == (0 if has_smi else 127)
    assert summary["failed_steps"] == ([] if has_smi else ["gpu_info"])
    assert summary["plan_vs_measured"] == {"plan": None, "measured": []}  # nothing measured


def test_gpu_summary_reads_pytest_counts_and_pairs_the_plan_with_measured_peaks(tmp_path):
    """The summary's parsers on the files the steps write: a real pytest run's log, a step
    matrix entry and a plan JSON in `mmgpt plan`'s shape (per mode a peak_gib and fits)."""
    log = tmp_path / "x_cuda_tests.log"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_kernels.py"), "-k", "like_length or auto_on_cuda"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    log.write_text(run.stdout)
    tsv = tmp_path / "steps.tsv"
    tsv.write_text(f"cuda_tests\t{run.returncode}\t3\t{log}\tpytest ...\n"
                   f"plan\tskipped\t0\t{tmp_path}/x_plan.log\tmmgpt plan ...\n")
    (tmp_path / "x_plan.json").write_text(json.dumps(
        {"modes": {"full": {"peak_gib": 20.5, "fits": True}, "off": {"peak_gib": 90.0, "fits": False}}}))
    (tmp_path / "x_step_matrix.json").write_text(json.dumps({"max_tokens": 4096, "matrix": [
        {"attn_backend": "sdpa", "gradient_checkpointing": "full", "liger": False, "peak_memory_gib": 18.0},
        {"attn_backend": "sdpa", "gradient_checkpointing": "full", "liger": True, "peak_memory_gib": 17.0}]}))
    out = tmp_path / "x_summary.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_summary.py"), str(tsv),
                    f"{tmp_path}/x_", "x", str(out)], check=True, timeout=60)
    summary = json.loads(out.read_text())
    tests = summary["steps"][0]["tests"]
    assert tests.get("passed", 0) >= 1 and tests.get("failed", 0) == 0, run.stdout
    assert tests["skipped"] == (0 if shutil.which("nvidia-smi") else 1)  # the CUDA-only one
    assert summary["steps"][1]["status"] == "skipped" and summary["failed_steps"] == []
    plan = {m["where"]: (m["peak_gib"], m["fits"]) for m in summary["plan_vs_measured"]["plan"]}
    assert plan == {".modes.full": (20.5, True), ".modes.off": (90.0, False)}
    (measured,) = summary["plan_vs_measured"]["measured"]  # liger-on entries left out
    assert measured["checkpointing"] == "full" and measured["peak_gib"] == 18.0


def test_step_matrix_covers_backend_checkpointing_liger_on_cpu():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "packing", "--matrix", "--preset", "tiny", "--samples", "30",
                              "--max-tokens", "128", "--steps", "1"])
    result = run_step_matrix(options(PackingBenchOptions, args))
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
