"""A non-editable install carries everything the defaults need (DeepSpeed configs, tiny tokenizer)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_non_editable_install_resolves_bundled_files(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, cwd=tmp_path,
                   env={**os.environ, "PIP_NO_INPUT": "1"})
    probe = ("import json, mmgpt, mmgpt.train.config as c, mmgpt.tokenizer as t; "
             "print(mmgpt.__file__); print(c.DS_CONFIG_DIR); "
             "print(json.loads((c.DS_CONFIG_DIR / 'zero2.json').read_text())['zero_optimization']['stage']); "
             "print(len(t.load_tokenizer(t.TINY_TOKENIZER_DIR)))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}).stdout.split()
    assert Path(out[0]).is_relative_to(target) and Path(out[1]).is_relative_to(target)  # not the checkout
    assert out[2:] == ["2", "1003"]
    # the lmms-eval task files ship, and the model's entry point is registered (mmgpt.eval.lmms)
    assert {f.name for f in (target / "mmgpt" / "eval" / "lmms_tasks").iterdir()} >= {"mmgpt_shapes.yaml", "utils.py"}
    [entry_points] = target.glob("mmgpt-*.dist-info/entry_points.txt")
    assert "[lmms_eval.models]\nmmgpt = mmgpt.eval.lmms:manifest" in entry_points.read_text()
