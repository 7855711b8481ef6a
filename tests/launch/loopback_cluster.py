"""Throwaway sshd and one-node Slurm cluster on loopback, for tests/test_launch_paths.py.

Everything lives in one temporary directory: generated host/user keys, a munge key, configs,
state, logs. Nothing in /etc is changed (sshd needs Debian's empty /run/sshd: made if absent); the
daemons run in the foreground as children of the test and are stopped when the `with` block ends.

  with Sshd(tmp) as ssh:       # sshd on 127.0.0.2 and 127.0.0.3, port ssh.port
      ssh.env()                # PATH with an `ssh` that reads ssh.config (hosts node0, node1)
  with Slurm(tmp) as slurm:    # munged + slurmctld + slurmd, one node (this machine)
      slurm.env()              # SLURM_CONF for sbatch/srun/scontrol

(pdsh and DeepSpeed's pre-launch `ssh HOST hostname` both run plain `ssh`, and OpenSSH reads
~/.ssh/config from the passwd entry's home, not $HOME: the `ssh` on PATH is therefore a
two-line wrapper for `/usr/bin/ssh -F <this config>`.)
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PREREQUISITES = {  # executable -> Debian package (tests/launch/install.sh installs them)
    "/usr/sbin/sshd": "openssh-server", "/usr/bin/ssh": "openssh-client", "/usr/bin/ssh-keygen": "openssh-client",
    "/usr/bin/pdsh": "pdsh", "/usr/sbin/munged": "munge", "/usr/sbin/slurmctld": "slurmctld",
    "/usr/sbin/slurmd": "slurmd", "/usr/bin/sbatch": "slurm-client", "/usr/bin/srun": "slurm-client",
    "/usr/bin/scontrol": "slurm-client", "/usr/bin/sinfo": "slurm-client",
}
NODES = {"node0": "127.0.0.2", "node1": "127.0.0.3"}  # host aliases -> loopback addresses


def missing_prerequisites() -> list[str]:
    return [f"{exe} ({pkg})" for exe, pkg in PREREQUISITES.items() if not os.access(exe, os.X_OK)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


class DaemonError(RuntimeError):
    """A daemon did not come up; the message names it and quotes its log."""


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else "(no log)"


class Sshd:
    def __init__(self, root: Path):
        self.root = root / "ssh"
        self.port = free_port()
        self.config = self.root / "ssh_config"
        self.log = self.root / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Sshd":
        r = self.root
        r.mkdir(parents=True)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mmgpt-test-{key}",
                            "-f", str(r / key)], check=True)
        shutil.copy(r / "user_key.pub", r / "authorized_keys")
        (r / "authorized_keys").chmod(0o600)
        listen = "".join(f"ListenAddress {addr}:{self.port}\n" for addr in NODES.values())
        (r / "sshd_config").write_text(
            f"{listen}HostKey {r / 'host_key'}\nAuthorizedKeysFile {r / 'authorized_keys'}\n"
            f"PidFile {r / 'sshd.pid'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "LogLevel VERBOSE\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
            f"AllowUsers {getpass.getuser()}\n")
        host_key = (r / "host_key.pub").read_text().split()[:2]
        (r / "known_hosts").write_text("".join(f"[{addr}]:{self.port} {' '.join(host_key)}\n"
                                               for addr in NODES.values()))
        hosts = "".join(f"Host {name}\n  HostName {addr}\n" for name, addr in NODES.items())
        self.config.write_text(
            f"{hosts}Host {' '.join(NODES)}\n  Port {self.port}\n  User {getpass.getuser()}\n"
            f"  IdentityFile {r / 'user_key'}\n  IdentitiesOnly yes\n  UserKnownHostsFile {r / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 10\n")
        (r / "bin").mkdir()
        wrapper = r / "bin" / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F "{self.config}" "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory (Debian)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(r / "sshd_config"), "-E", str(self.log)])
        for _ in range(100):
            up = subprocess.run([str(wrapper), "node1", "true"], capture_output=True, timeout=30)
            if up.returncode == 0:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        err = up.stderr.decode(errors="replace").strip()
        self.__exit__()
        raise DaemonError(f"sshd on {list(NODES.values())} port {self.port} not reachable: {err}\n{_tail(self.log)}")

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


class Slurm:
    def __init__(self, root: Path):
        self.root = root / "slurm"
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env()})

    def __enter__(self) -> "Slurm":
        r = self.root
        for sub in ("munge-key", "munge-run", "state", "spool", "log"):
            (r / sub).mkdir(parents=True)
        (r / "munge-key").chmod(0o700)
        key = r / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge-run" / "munge.socket"
        user = getpass.getuser()
        self.conf.write_text(
            f"ClusterName=mmgpttest\nSlurmctldHost={self.node}(127.0.0.1)\n"
            f"SlurmctldPort={free_port()}\nSlurmdPort={free_port()}\nSlurmUser={user}\nSlurmdUser={user}\n"
            f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}\n"
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny\n"
            f"StateSaveLocation={r / 'state'}\nSlurmdSpoolDir={r / 'spool'}\n"
            f"SlurmctldPidFile={r / 'slurmctld.pid'}\nSlurmdPidFile={r / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}\nSlurmdLogFile={r / 'log' / 'slurmd.log'}\n"
            # no cgroups, no accounting: nothing beyond plain processes is needed on the node
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_CPU\nMpiDefault=none\nReturnToService=2\n"
            # `sbatch --wait` sleeps 2 s between polls and multiplies that by 4 (up to 32 s) while it is
            # under MinJobAge / 2 (its _job_wait): with the default 300 a finished job was seen up to
            # 32 s late; with 4 it polls every 2 s (a finished job's record stays 4 s)
            "MinJobAge=4\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN\n"
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n")
        self._start("munged", ["/usr/sbin/munged", "-F", "-f", "-S", str(sock), f"--key-file={key}",
                               f"--log-file={r / 'log' / 'munged.log'}", f"--pid-file={r / 'munged.pid'}",
                               f"--seed-file={r / 'munge-run' / 'seed'}"])
        self._wait("munged", lambda: sock.exists(), r / "log" / "munged.log")
        self._start("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", ["/usr/sbin/slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait("slurmd", self._node_idle, r / "log" / "slurmd.log")
        return self

    def _node_idle(self) -> bool:
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30,
                               env={**os.environ, **self.env()})
        return state.returncode == 0 and state.stdout.strip() == "idle"

    def _wait(self, name: str, ready, log: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            if ready():
                return
            time.sleep(0.5)
        self.__exit__()
        dead = dead or [name]
        logs = "\n".join(f"--- {n}:\n{_tail(self.root / 'log' / f'{n}.out')}" for n in dead)
        raise DaemonError(f"{', '.join(dead)} did not come up (exit codes "
                          f"{[self.procs[n].poll() for n in dead if n in self.procs]}):\n{logs}\n--- {log.name}:\n{_tail(log)}")

    def __exit__(self, *exc) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", getpass.getuser()], capture_output=True, timeout=30,
                           env={**os.environ, **self.env()})
        for name in ("slurmd", "slurmctld", "munged"):
            _stop(self.procs.get(name))
