"""lmms-eval runs an mmgpt export through the `mmgpt` model on the bundled local tasks (the sample
data's files: no hub access) and agrees with `mmgpt eval` on the same items:
  mmgpt_shapes     (generate_until) == `--task llava`: the same prediction string per item, the
                   same exact-match score;
  mmgpt_aokvqa_mc  (loglikelihood)  == `--task aokvqa --answer-hint ""`: each choice's
                   log-likelihood to 1e-4 (float32, other batch shapes), the same MC accuracy.

The model is the tiny open-gate base with a random nonzero LoRA (test_export.make_run), whose
outputs differ from image to image: equal strings and scores need equal pixels, prompt ids, media
layout and decoding in both harnesses (its scores are near 0; the per-item values carry the check).

lmms-eval lives beside mmgpt's pins in its own venv (tests/lmms/install.sh; .ci/run makes it): the
test runs `python -m lmms_eval` with MMGPT_LMMS_PYTHON, or this python when lmms_eval imports here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from model_helpers import randomize_lora_b
from test_export import make_run, save_run

from mmgpt.cli import main
from mmgpt.export import export
from mmgpt.models.builder import ModelConfig, build_model

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


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The sample data, a random-LoRA export, and a python that sees lmms-eval and mmgpt's entry point."""
    python = lmms_python()
    root = tmp_path_factory.mktemp("lmms")
    assert main(["data", "sample", "--out", str(root / "sample")]) == 0
    run, _ = make_run(root / "model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf_datasets")}
    registered = subprocess.run([python, "-c", "from importlib.metadata import entry_points; print(sorted(e.value "
                                 "for e in entry_points(group='lmms_eval.models') if e.name == 'mmgpt'))"],
                                env=env, capture_output=True, text=True, timeout=60)
    assert registered.stdout.strip() == "['mmgpt.eval.lmms:manifest']", (
        f"{python} does not see mmgpt's lmms_eval.models entry point (pip install -e . first): {registered}")
    return {"python": python, "env": env, "root": root, "data": root / "sample",
            "model": export(run, root / "export"), "run": tiny_run(root / "tiny")}


def tiny_run(root: Path) -> Path:
    """A training run of the tiny preset (random nonzero LoRA) as the demo writes one: its tokenizer is
    the bundled sentencepiece-only one (no tokenizer.json), which lmms-eval's venv must read too."""
    cfg = ModelConfig(preset="tiny")
    model = build_model(cfg).model
    randomize_lora_b(model, std=0.2)
    return save_run(root, cfg, model)


def mmgpt_eval(setup: dict, name: str, *args: str, model: str = "model") -> dict:
    output = setup["root"] / f"{name}.json"
    assert main(["eval", "--model", str(setup[model]), "--limit", str(LIMIT), "--batch-size", "4",
                 "--workers", "0", "--output", str(output), *args]) == 0
    report = json.loads(output.read_text())
    assert report["n"] == LIMIT and report["skipped"]["count"] == 0
    return report


def lmms_eval(setup: dict, task: str, model: str = "model") -> tuple[dict, list[dict]]:
    """(the task's results, the logged samples in document order) of one `python -m lmms_eval` run
    on `setup[model]`: the export, or a tiny training run (README's form, the bundled tokenizer)."""
    out = setup["root"] / f"lmms_{task}"
    proc = subprocess.run([setup["python"], "-m", "lmms_eval", "--model", "mmgpt", "--model_args",
                           f"pretrained={setup[model]}", "--tasks", task, "--include_path", str(TASKS),
                           "--limit", str(LIMIT), "--batch_size", "4", "--output_path", str(out), "--log_samples"],
                          cwd=setup["data"], env=setup["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results] = out.rglob("*_results.json")
    [samples] = out.rglob(f"*_samples_{task}.jsonl")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(logged) == LIMIT
    return json.loads(results.read_text())["results"][task], logged


def test_generate_until_equals_mmgpt_eval_on_the_sample_shapes(setup):
    data = setup["data"]
    report = mmgpt_eval(setup, "shapes", "--task", "llava", "--data", str(data / "shapes/shapes_val.json"),
                        "--images", str(data / "shapes/images"))
    results, logged = lmms_eval(setup, "mmgpt_shapes")
    ours = [p["prediction"] for p in report["predictions"]]
    assert [s["filtered_resps"] for s in logged] == ours
    assert len(set(ours)) > 1, "the random model's outputs depend on the image: the strings carry the check"
    assert [s["target"] for s in logged] == [p["answers"][0] for p in report["predictions"]]
    assert results["exact_match,none"] == report["metrics"]["exact_match"]


def test_loglikelihood_equals_mmgpt_evals_choice_scores_on_the_sample_aokvqa(setup):
    data = setup["data"]
    report = mmgpt_eval(setup, "aokvqa", "--task", "aokvqa", "--split", "train", "--answer-hint", "",
                        "--data", str(data / "aokvqa/aokvqa_v1p0_train.json"), "--images", str(data / "coco/images"),
                        model="run")
    results, logged = lmms_eval(setup, "mmgpt_aokvqa_mc", model="run")
    for sample, prediction in zip(logged, report["predictions"]):
        theirs = [float(ll) for ll, _ in sample["filtered_resps"]]
        assert len(theirs) == len(prediction["choice_scores"]) and None not in prediction["choice_scores"]
        assert max(abs(a - b) for a, b in zip(theirs, prediction["choice_scores"])) < 1e-4, (theirs, prediction)
    assert results["acc,none"] == pytest.approx(report["metrics"]["mc_accuracy"], abs=1e-12)
