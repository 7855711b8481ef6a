"""The launch scripts validate before launching: a bad hostfile / DeepSpeed JSON / .deepspeed_env
prints one `launch_check: error:` line, exits 2, and no DeepSpeed launcher is started."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_script(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture
def config(tmp_path) -> Path:
    (tmp_path / "d.jsonl").write_text('{"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}\n')  # one usable record: an empty mixture is refused too
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("sources:\n- {name: d, type: dolly, path: d.jsonl}\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"mixture: {mixture}\noutput_dir: {tmp_path / 'out'}\nschedule: {{grad_accum: 2}}\n")
    return path


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch_check: error: ") and message in lines[0], result.stderr
    assert "deepspeed.launcher" not in result.stdout + result.stderr  # nothing was started


def test_multi_node_refuses_duplicate_host(tmp_path, config):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-a slots=2\n")
    assert_refused(run_script("launch/multi_node.sh", str(config), str(hosts), "2"),
                   "hosts:2: host 'node-a' is listed twice")


def test_multi_node_refuses_more_gpus_than_slots(tmp_path, config):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=4\n")
    assert_refused(run_script("launch/multi_node.sh", "--no-ssh", str(config), str(hosts), "8", NODE_RANK="0",
                              MASTER_ADDR="127.0.0.1"),
                   "8 GPUs per node requested but host 'node-b' has slots=4")


def test_multi_node_writes_and_checks_deepspeed_env(tmp_path, config):
    """MMGPT_EXPORT writes .deepspeed_env in the directory the launcher reads it from (the repo root);
    run on a copy of the script so the real repo root is left alone."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "launch" / "multi_node.sh").write_text((REPO / "launch" / "multi_node.sh").read_text())
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\n")
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["train_batch_size"] = 3  # make the launch stop at the batch check, after the env file is written
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    config.write_text(config.read_text() + f"deepspeed: {tmp_path / 'ds.json'}\n")
    result = run_script(str(repo / "launch" / "multi_node.sh"), str(config), str(hosts), "2", cwd=tmp_path,
                        MMGPT_EXPORT="MMGPT_TEST_A MMGPT_TEST_UNSET", MMGPT_TEST_A="x y=z")
    assert_refused(result, "train_batch_size=3 does not match")
    assert (repo / ".deepspeed_env").read_text() == "MMGPT_TEST_A=x y=z\n"


def test_single_node_refuses_bad_ds_config(tmp_path, config):
    (tmp_path / "ds.json").write_text('{"bf16": {"enabled": true},\n "zero_optimization": {"stage": 3}}')
    config.write_text(config.read_text() + f"deepspeed: {tmp_path / 'ds.json'}\n")
    assert_refused(run_script("launch/single_node.sh", str(config), "2"), "zero_optimization.stage=3 is not supported")


def test_demo_requires_an_output_dir():
    result = run_script("launch/demo.sh")
    assert result.returncode != 0 and "usage: bash launch/demo.sh OUT_DIR" in result.stderr
