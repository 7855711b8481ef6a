"""Jobs sharing a machine: a busy master port is one line naming it and MASTER_PORT (in the launch
script before anything starts, and in `mmgpt train` itself where a multi-node launch meets it), and
ranks of two different runs that rendezvous into one group are refused on every rank."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmgpt.data.sample import write_sample
from mmgpt.train.master_port import PortError, check_port, free_port

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo_tiny.yaml"


@pytest.fixture
def busy_port():
    """A port some other job is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
            **extra}


def one_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def test_free_port_is_free_and_a_busy_one_is_refused(busy_port):
    check_port(free_port())
    with pytest.raises(PortError, match=f"master port {busy_port} \\(MASTER_PORT\\): in use by another process"):
        check_port(busy_port)


def test_demo_refuses_a_busy_master_port_in_one_line(tmp_path, busy_port):
    write_sample(tmp_path / "data", records=20, max_length=512)
    result = subprocess.run(["bash", "launch/demo.sh", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env(MASTER_PORT=str(busy_port)))
    line = one_line(result, "error: master port")
    assert f"master port {busy_port} (MASTER_PORT): in use by another process" in line
    assert "deepspeed.launcher" not in result.stdout + result.stderr and not (tmp_path / "checkpoints").exists()


def train(out: Path, mixture: Path, rank: int, port: int) -> subprocess.Popen:
    """One rank of `mmgpt train` joining a 2-rank group on `port`, as a launcher would start it."""
    return subprocess.Popen([sys.executable, "-m", "mmgpt.train.cli", "--config", str(CONFIG), "--set",
                             f"mixture={mixture}", "--output-dir", str(out), "--max-steps", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))


def test_ranks_of_two_runs_in_one_group_are_refused_on_every_rank(tmp_path):
    """Rank 0 of run A and rank 1 of run B meet on one port (two jobs, one MASTER_PORT): both stop
    with the same one line, and neither writes anything into its output directory."""
    mixture = write_sample(tmp_path / "data", records=20, max_length=512)
    port = free_port()
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    procs = [train(out, mixture, rank, port) for rank, out in enumerate(runs)]
    lines = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        lines.append(one_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                              "mmgpt train: error: rank 1 belongs to another run"))
    assert lines[0] == lines[1]
    assert f"output_dir {runs[1]}" in lines[0] and f"rank 0 (output_dir {runs[0]}" in lines[0]
    assert "MASTER_PORT" in lines[0]
    assert all(not out.exists() or not any(out.iterdir()) for out in runs)


def test_train_names_a_busy_master_port_in_one_line(tmp_path, busy_port):
    """Where no launch script checks first (multi-node: the master node's rank 0 meets the busy port)."""
    mixture = write_sample(tmp_path / "data", records=20, max_length=512)
    result = subprocess.run([sys.executable, "-m", "mmgpt.train.cli", "--config", str(CONFIG), "--set",
                             f"mixture={mixture}", "--output-dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(busy_port)))
    line = one_line(result, "mmgpt train: error: master port")
    assert line.endswith(f"master port {busy_port} (MASTER_PORT) on 127.0.0.1: in use by another process")
