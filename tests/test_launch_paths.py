"""Every launch path run for real, on this machine over loopback (CPU, 2 ranks, gloo, ZeRO-2 bf16):

  single  `bash launch/single_node.sh CONFIG 2` (deepspeed --num_gpus 2): the reference
  pdsh    `bash launch/multi_node.sh CONFIG HOSTFILE 1` in pdsh mode: hostfile `node0 slots=1`,
          `node1 slots=1`; DeepSpeed's PDSHRunner reaches both through pdsh and a throwaway sshd
          listening on 127.0.0.2 / 127.0.0.3 (its own host key, a user key made for the test)
  slurm   `sbatch --wait launch/slurm.sbatch CONFIG` on a throwaway one-node Slurm cluster
          (munged, slurmctld, slurmd in the foreground; tests/launch/loopback_cluster.py)
  scancel the same job cancelled with `scancel` after step 2 (Slurm's SIGTERM to every process of
          the job, SIGKILL after KillWait), then the same sbatch again (it always resumes)
  pdshstop the pdsh launch with SIGTERM to its `deepspeed` runner after step 2, then the same
          command again (multi_node.sh always resumes). Run alone: DeepSpeed's runner, signalled,
          runs `pkill -f "<python> -u -m deepspeed.launcher.launch"` on every host, which on this
          one machine would stop the other runs' launch.py too

Same config, seed, data and steps as tests/test_launch.py; the three runs go concurrently and must
produce bitwise the same losses, data order and adapter tensors. single, pdsh, slurm and the first
scancel job start in the background thread after tests/test_launch.py's runs
(tests/background_runs.py); the pdsh stop and the two relaunches run in the fixture, alone. The packages come
from tests/launch/install.sh (.ci/run calls it): under CI=true a missing one fails the run.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from mmgpt.data.sample import write_sample
from background_runs import NICE, Job
from test_launch import STEPS, adapter, assert_trains_like, data_order, scalars, train_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "launch"))
from loopback_cluster import NODES, Slurm, Sshd, free_port, missing_prerequisites  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 900
DS_ENV = REPO / ".deepspeed_env"

pytestmark = pytest.mark.skipif(subprocess.run(["which", "deepspeed"], capture_output=True).returncode != 0,
                                reason="needs deepspeed: the launcher is not on PATH")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def start(cmd: list[str], log: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([*NICE, *cmd], cwd=REPO, env=env(**extra), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: killed whole on a timeout


def finish(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    try:
        return {name: proc.wait(timeout=TIMEOUT) for name, proc in procs.items()}
    except subprocess.TimeoutExpired:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        raise


def sbatch(name: str, job_log: Path, config: Path) -> list[str]:
    """The batch script fitted to this node (it asks for 2 nodes x 8 GPUs), waited for."""
    return ["sbatch", "--wait", f"--job-name={name}", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
            f"--output={job_log}", "launch/slurm.sbatch", str(config)]


def scancel_after(order_log: Path, steps: int, job: str, slurm_env: dict[str, str]) -> None:
    """`scancel` job `job` once its rank 0 has logged `steps` steps."""
    wait_for_steps(order_log, steps)
    subprocess.run(["scancel", f"--name={job}"], env=env(**slurm_env), check=True, timeout=60)


def wait_for_steps(order_log: Path, steps: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (order_log.is_file() and len(order_log.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"{order_log} never reached step {steps}"
        time.sleep(0.2)


def sigterm_after(proc: subprocess.Popen, order_log: Path, steps: int, config: Path) -> dict:
    """SIGTERM the `deepspeed` runner `proc` (multi_node.sh execs it) once rank 0 has logged `steps`
    steps; how it and the ranks ended. The ranks are not its descendants (sshd started them): they
    (and their data workers) are found by their command line; any alive 120 s after the signal is killed."""
    wait_for_steps(order_log, steps)
    ranks = [p for p in psutil.process_iter(["cmdline"])
             if "-m mmgpt.train.cli --local_rank=" in (cmd := " ".join(p.info["cmdline"] or [])) and str(config) in cmd]
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = finish({"runner": proc})["runner"]
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    for p in alive:
        p.kill()
    return {"code": code, "ranks": len(ranks), "alive": len(alive), "seconds": time.monotonic() - sent}


@dataclass
class Started:
    """The paths' runs up to the pdsh stop (which must run alone), with the daemons still up."""

    root: Path
    out: dict[str, Path]
    cfgs: dict[str, Path]
    saved_env: bytes | None
    daemons: ExitStack
    sshd: Sshd
    slurm: Slurm
    codes: dict[str, int] = field(default_factory=dict)

    def multi_node(self, name: str, log: str) -> subprocess.Popen:
        # the remote ranks get a login shell's environment: what they need travels in
        # .deepspeed_env (MMGPT_EXPORT), PYTHONPATH is exported by DeepSpeed itself
        return start(["bash", "launch/multi_node.sh", str(self.cfgs[name]), str(self.root / "hostfile"), "1"],
                     self.root / log, **self.sshd.env(), MASTER_ADDR=NODES["node0"], MASTER_PORT=str(free_port()),
                     MMGPT_EXPORT="OMP_NUM_THREADS TOKENIZERS_PARALLELISM")

    def sbatch(self, name: str, job: str, log: str, job_log: str) -> subprocess.Popen:
        # the batch script asks for 2 nodes x 8 GPUs: the command line fits it to this node
        return start(sbatch(job, self.root / job_log, self.cfgs[name]), self.root / log, **self.slurm.env(),
                     MMGPT_GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))


def restore_env(saved: bytes | None) -> None:
    """Put the repo's .deepspeed_env back as it was (multi_node.sh (re)writes it)."""
    if saved is None:
        DS_ENV.unlink(missing_ok=True)
    else:
        DS_ENV.write_bytes(saved)


def start_runs(root: Path) -> Started:
    """single, pdsh, slurm and the first scancel job, concurrently (in the background thread)."""
    missing = missing_prerequisites()
    if missing:
        pytest.skip(f"needs sshd, pdsh and slurm: missing {', '.join(missing)} (bash tests/launch/install.sh)")
    out = {name: root / name for name in ("single", "pdsh", "slurm", "scancel", "pdshstop")}
    mixture = write_sample(root / "data", records=200, max_length=512)
    cfgs = {name: train_config(root / f"{name}.yaml", mixture, out[name]) for name in out}
    (root / "hostfile").write_text("".join(f"{name} slots=1\n" for name in NODES))
    saved_env = DS_ENV.read_bytes() if DS_ENV.exists() else None
    daemons = ExitStack()
    try:
        sshd, slurm = daemons.enter_context(Sshd(root)), daemons.enter_context(Slurm(root))
        runs = Started(root, out, cfgs, saved_env, daemons, sshd, slurm)
        procs = {"single": start(["bash", "launch/single_node.sh", str(cfgs["single"]), "2"], root / "single.log",
                                 MASTER_PORT=str(free_port())),
                 "pdsh": runs.multi_node("pdsh", "pdsh.log"),
                 "slurm": runs.sbatch("slurm", "mmgpt-test", "slurm.log", "slurm-job.log"),
                 "scancel1": runs.sbatch("scancel", "mmgpt-scancel", "scancel1.log", "scancel-job1.log")}
        scancel_after(out["scancel"] / "data_order" / "rank_000.jsonl", 2, "mmgpt-scancel", slurm.env())
        runs.codes = finish(procs)
        return runs
    except BaseException:
        daemons.close()
        restore_env(saved_env)
        raise


def finish_runs(runs: Started) -> dict:
    """The pdsh stop alone (DeepSpeed's runner, signalled, pkills every launch.py of the user), then
    the second scancel job and the pdsh relaunch; the daemons stop and .deepspeed_env is restored."""
    try:
        with runs.daemons:
            pdsh_stopped = sigterm_after(runs.multi_node("pdshstop", "pdshstop1.log"),
                                         runs.out["pdshstop"] / "data_order" / "rank_000.jsonl", 2,
                                         runs.cfgs["pdshstop"])
            runs.codes.update(finish({"scancel2": runs.sbatch("scancel", "mmgpt-scancel", "scancel2.log",
                                                                   "scancel-job2.log"),
                                      "pdshstop2": runs.multi_node("pdshstop", "pdshstop2.log")}))
            deepspeed_env = DS_ENV.read_text() if DS_ENV.exists() else None
    finally:
        restore_env(runs.saved_env)
    return {**runs.out, "codes": runs.codes, "logs": runs.root, "sshd": runs.sshd, "deepspeed_env": deepspeed_env,
            "saved_env": runs.saved_env, "pdsh_stopped": pdsh_stopped}


BACKGROUND = Job("paths", start_runs)  # started at collection, after test_launch.py's, by tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return finish_runs(BACKGROUND.result(tmp_path_factory))


def log(runs, name: str) -> str:
    return (runs["logs"] / f"{name}.log").read_text(errors="replace")


def expect_success(runs, *names: str) -> None:
    for name in names:
        extra = log(runs, "slurm-job")[-4000:] if name == "slurm" and (runs["logs"] / "slurm-job.log").exists() else ""
        assert runs["codes"][name] == 0, log(runs, name)[-4000:] + extra


def assert_same_training(runs, name: str) -> None:
    """Bitwise the same training as `single`: same world (2 ranks), seed, data and steps, and a
    2-rank gloo all-reduce is exact, so the launch path must not change a single bit. (The
    ZeRO-2 bf16 step is deterministic on CPU: tests/test_launch.py's runs differ only where a
    run is resumed or injected with a NaN, which is why it compares with a tolerance.)"""
    expect_success(runs, "single", name)
    one, other = scalars(runs["single"]), scalars(runs[name])
    assert sorted(one["train/loss"]) == list(range(1, STEPS + 1))
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        assert other[tag] == one[tag], tag
    assert data_order(runs[name]) == data_order(runs["single"])
    weights_one, weights_other = adapter(runs["single"]), adapter(runs[name])
    assert weights_one and weights_other.keys() == weights_one.keys()
    differ = [key for key in weights_one if not torch.equal(weights_other[key], weights_one[key])]
    assert differ == [], f"{len(differ)} of {len(weights_one)} adapter tensors differ from the single-node run"

def test_pdsh_two_nodes_match_single_node(runs):
    assert_same_training(runs, "pdsh")


def test_pdsh_reached_each_node_through_sshd(runs):
    expect_success(runs, "pdsh")
    printed = log(runs, "pdsh")
    assert "launch_check: ok: world 2" in printed
    assert f"cmd = pdsh -S -f 1024 -w {','.join(NODES)}" in printed
    assert "export OMP_NUM_THREADS=1; export TOKENIZERS_PARALLELISM=false;" in printed  # from .deepspeed_env
    assert f"cd {REPO};" in printed and "--node_rank=%n" in printed
    lines = printed.splitlines()
    for rank, name in enumerate(NODES):  # pdsh prefixes each line with the host it came from
        assert any(line.startswith(f"{name}: ") and f"nnodes=2, num_local_procs=1, node_rank={rank}" in line
                   for line in lines), name
    sshd = runs["sshd"].log.read_text()
    for addr in NODES.values():  # a real ssh login on each node's address (LogLevel VERBOSE)
        assert f" on {addr} port {runs['sshd'].port}" in sshd, sshd[-3000:]
    assert sshd.count("Accepted publickey for ") >= 3  # DeepSpeed's ssh check + one pdsh login per node
    assert runs["deepspeed_env"] == "OMP_NUM_THREADS=1\nTOKENIZERS_PARALLELISM=false\n"  # MMGPT_EXPORT
    assert (DS_ENV.read_bytes() if DS_ENV.exists() else None) == runs["saved_env"]  # the repo's left as found

def test_slurm_job_matches_single_node(runs):
    assert_same_training(runs, "slurm")


def test_slurm_job_launched_through_srun(runs):
    expect_success(runs, "slurm")
    assert "Submitted batch job" in log(runs, "slurm")
    job = log(runs, "slurm-job")
    assert "launch_check: ok: world 2" in job
    assert "nnodes=1, num_local_procs=2, node_rank=0" in job  # deepspeed --no_ssh --node_rank $SLURM_NODEID
    assert not list(REPO.glob(".hostfile.*"))  # the job's generated hostfile is removed on exit


def test_scancel_stops_every_rank_after_a_saved_checkpoint_and_the_job_resumes(runs):
    """Slurm's cancel (SIGTERM to every process of the job): the ranks finish the step, save, exit;
    the same sbatch again resumes and trains as the uninterrupted single-node run."""
    expect_success(runs, "single", "scancel2")
    assert runs["codes"]["scancel1"] != 0, log(runs, "scancel1")
    train_log = (runs["scancel"] / "train.log").read_text()
    step = int(re.search(r"stopped after step (\d+): [12] rank\(s\) asked to stop", train_log)[1])
    assert 2 <= step < STEPS, train_log[-3000:]
    assert f"resumed from {runs['scancel'] / 'checkpoints' / f'step_{step:08d}'} at step {step}" in train_log
    assert_trains_like(runs["scancel"], runs["single"])


def test_sigterm_to_the_pdsh_launch_stops_every_rank_after_a_saved_checkpoint_and_resumes(runs):
    """SIGTERM to the `deepspeed` runner of a pdsh launch (what a Ctrl-C or a scheduler sends): the
    runner SIGINTs/SIGTERMs pdsh (the ranks' stdout, through ssh, closes) and pkills launch.py on
    every host, which SIGTERMs its rank; both ranks finish the step, save, exit, and the same command
    again resumes and trains as the uninterrupted single-node run."""
    expect_success(runs, "single", "pdshstop2")
    stopped = runs["pdsh_stopped"]
    first = log(runs, "pdshstop1")[-3000:]
    assert stopped["code"] != 0 and stopped["ranks"] >= 2, (stopped, first)  # the ranks and their data workers
    assert stopped["alive"] == 0, (stopped, first)  # all gone within 120 s of the signal (measured: 5-8 s)
    train_log = (runs["pdshstop"] / "train.log").read_text()
    step = int(re.search(r"stopped after step (\d+): [12] rank\(s\) asked to stop", train_log)[1])
    assert 2 <= step < STEPS, train_log[-3000:]
    assert f"saved checkpoint {runs['pdshstop'] / 'checkpoints' / f'step_{step:08d}'}" in train_log
    assert f"resumed from {runs['pdshstop'] / 'checkpoints' / f'step_{step:08d}'} at step {step}" in train_log
    assert_trains_like(runs["pdshstop"], runs["single"])
