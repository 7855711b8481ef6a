"""`mmgpt bench train` runs the real step in one process on CPU and reports every promised field."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("step_time_s", "tokens_per_s", "supervised_tokens_per_s", "mfu", "data_wait_s", "data_wait_share",
          "peak_memory_gib", "host_syncs_per_step", "aten_ops_per_step")


def test_bench_train_tiny_cpu_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mmgpt.cli", "bench", "train", "--preset", "tiny", "--device", "cpu",
                           "--steps", "1", "--warmup", "0", "--records", "60", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["data_workers"] == 1 and result["world"] == 1 and result["skipped_steps"] == 0
    for name in FIELDS:
        assert result[name] is not None and result[name] >= 0, name
    assert result["tokens_per_s"] > 0 and result["aten_ops_per_step"] > 0
    assert "tokens/s" in proc.stdout and "host syncs" in proc.stdout
