"""lmms-eval runs an mmgpt export through the `mmgpt` model and the bundled `mmgpt_shapes` task
(the sample data's visual task, a local file: no hub access) and agrees with `mmgpt eval --task
llava` on the same items: the same prediction string per item and the same exact-match score.

The model is the tiny open-gate base with a random nonzero LoRA (test_export.make_run), whose
greedy outputs differ from image to image: equal strings need equal pixels, prompt ids, media
layout and decoding in both harnesses (its score is 0 on shapes; the strings carry the check).

lmms-eval lives beside mmgpt's pins in its own venv (.ci/run makes it): the test runs
`python -m lmms_eval` with MMGPT_LMMS_PYTHON, or this python when lmms_eval imports here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import make_run

from mmgpt.cli import main
from mmgpt.export import export

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "mmgpt" / "eval" / "lmms_tasks"
LIMIT = 8


def lmms_python() -> str:
    if importlib.util.find_spec("lmms_eval") is not None:
        return sys.executable
    python = os.environ.get("MMGPT_LMMS_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip("needs lmms-eval: not importable here and MMGPT_LMMS_PYTHON names no python "
                    f"({python!r}); .ci/run makes the venv")
    return python


def test_lmms_eval_equals_mmgpt_eval_on_the_sample_shapes(tmp_path):
    python = lmms_python()
    data = tmp_path / "sample"
    assert main(["data", "sample", "--out", str(data)]) == 0
    run, _ = make_run(tmp_path / "model")
    model = export(run, tmp_path / "export")
    report_path = tmp_path / "mmgpt_eval.json"
    assert main(["eval", "--model", str(model), "--task", "llava", "--data", str(data / "shapes/shapes_val.json"),
                 "--images", str(data / "shapes/images"), "--limit", str(LIMIT), "--batch-size", "4",
                 "--workers", "0", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    out = tmp_path / "lmms_out"
    registered = subprocess.run([python, "-c", "from importlib.metadata import entry_points; print(sorted(e.value "
                                 "for e in entry_points(group='lmms_eval.models') if e.name == 'mmgpt'))"],
                                env=env, capture_output=True, text=True, timeout=60)
    assert registered.stdout.strip() == "['mmgpt.eval.lmms:manifest']", (
        f"{python} does not see mmgpt's lmms_eval.models entry point (pip install -e . first): {registered}")
    proc = subprocess.run([python, "-m", "lmms_eval", "--model", "mmgpt", "--model_args", f"pretrained={model}",
                           "--tasks", "mmgpt_shapes", "--include_path", str(TASKS), "--limit", str(LIMIT),
                           "--batch_size", "4", "--output_path", str(out), "--log_samples"],
                          cwd=data, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results] = out.rglob("*_results.json")
    [samples] = out.rglob("*_samples_mmgpt_shapes.jsonl")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])

    assert report["n"] == len(logged) == LIMIT and report["skipped"]["count"] == 0
    theirs = [s["filtered_resps"] for s in logged]
    ours = [p["prediction"] for p in report["predictions"]]
    assert theirs == ours
    assert len(set(ours)) > 1, "the random model's outputs depend on the image: the strings carry the check"
    assert [s["target"] for s in logged] == [p["answers"][0] for p in report["predictions"]]
    score = json.loads(results.read_text())["results"]["mmgpt_shapes"]["exact_match,none"]
    assert score == report["metrics"]["exact_match"]
