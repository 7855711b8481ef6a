"""Pre-launch validation: hostfile, DeepSpeed JSON and train config, before any rank starts.

The launch scripts run `python -m mmgpt.train.launch_check ...` first; a bad input prints ONE line
naming the file, line and problem and exits 2, so nothing is started on any node.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mmgpt.train.ds_config import DSConfigError, load_ds_config, resolve_batch

_HOST_LINE = re.compile(r"^(?P<host>[^\s=]+)\s+slots=(?P<slots>\S+)$")


class LaunchError(ValueError):
    """An input that must be fixed before launching (one line, names file and line)."""


@dataclass
class Host:
    name: str
    slots: int
    line: int


def parse_hostfile(path: str | Path) -> list[Host]:
    """DeepSpeed hostfile: one `HOST slots=N` per line; blank lines and `#` comments allowed."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"{path}: hostfile not found")
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise LaunchError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        name, slots = match["host"], match["slots"]
        if not slots.isdigit() or int(slots) < 1:
            raise LaunchError(f"{path}:{number}: slots must be a positive integer, got {slots!r}")
        if name in seen:
            raise LaunchError(f"{path}:{number}: host {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = number
        hosts.append(Host(name, int(slots), number))
    if not hosts:
        raise LaunchError(f"{path}: no hosts (every line is blank or a comment)")
    return hosts


def world_size(hostfile: str | Path | None, num_gpus: int | None, num_nodes: int | None) -> int:
    """Ranks the launcher will start; checks requested GPUs/nodes against the hostfile's slots."""
    if num_gpus is not None and num_gpus < 1:
        raise LaunchError(f"--num-gpus must be >= 1, got {num_gpus}")
    if num_nodes is not None and num_nodes < 1:
        raise LaunchError(f"--num-nodes must be >= 1, got {num_nodes}")
    if hostfile is None:
        return (num_nodes or 1) * (num_gpus or 1)
    hosts = parse_hostfile(hostfile)
    if num_nodes is not None:
        if num_nodes > len(hosts):
            raise LaunchError(f"{hostfile}: {num_nodes} nodes requested but the hostfile lists {len(hosts)}")
        hosts = hosts[:num_nodes]
    if num_gpus is None:
        return sum(h.slots for h in hosts)
    for h in hosts:
        if num_gpus > h.slots:
            raise LaunchError(f"{hostfile}:{h.line}: {num_gpus} GPUs per node requested but host "
                              f"{h.name!r} has slots={h.slots}")
    return num_gpus * len(hosts)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_deepspeed_env(path: str | Path) -> int:
    """`.deepspeed_env` (exported to every node by the pdsh launcher): strictly `NAME=VALUE` lines.

    DeepSpeed splits each line on the first `=` with no tolerance: a blank line or a comment
    crashes the launcher on the first node, after the others have been contacted.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        name, sep, _ = line.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise LaunchError(f"{path}:{number}: expected NAME=VALUE (no blank lines or comments: "
                              f"DeepSpeed reads every line), got {line!r}")
    return len(lines)


def check(config: str | Path | None, ds_config: str | Path | None, world: int,
          overrides: list[str] = ()) -> str:
    """Validate the train config and DeepSpeed JSON for `world` ranks; return a summary line."""
    micro, accum = 1, None
    if config is not None:
        from mmgpt.config import TrainConfig  # heavy import (transformers), only when asked

        cfg = TrainConfig.load(config, overrides)
        if not Path(cfg.mixture).is_file():
            raise LaunchError(f"{config}: mixture file not found: {cfg.mixture}")
        micro, accum = cfg.packing.rows_per_batch, cfg.schedule.grad_accum
        ds_config = ds_config or cfg.deepspeed
    if ds_config is None:
        return f"world {world}"
    ds = load_ds_config(ds_config)
    if accum is None:  # no train config: the JSON's own numbers must be consistent
        accum = ds.get("gradient_accumulation_steps", "auto")
        micro = ds.get("train_micro_batch_size_per_gpu", "auto")
        if "auto" in (accum, micro):
            return f"world {world}; {ds_config}: batch fields are filled from the train config"
    ds = resolve_batch(ds, micro, accum, world, where=str(ds_config))
    return (f"world {world}; global batch {micro} row(s) x accumulation {accum} x {world} ranks "
            f"= {ds['train_batch_size']} rows per step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgpt.train.launch_check", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="mmgpt train config (YAML/JSON)")
    parser.add_argument("--ds-config", help="DeepSpeed JSON (default: the train config's `deepspeed`)")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile")
    parser.add_argument("--num-gpus", type=int, help="ranks per node")
    parser.add_argument("--num-nodes", type=int, help="nodes to use")
    parser.add_argument("--deepspeed-env", help="a .deepspeed_env file to check")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for mmgpt train")
    args = parser.parse_args(argv)
    try:
        world = world_size(args.hostfile, args.num_gpus, args.num_nodes)
        summary = check(args.config, args.ds_config, world, args.overrides)
        if args.deepspeed_env:
            summary += f"; {args.deepspeed_env}: {check_deepspeed_env(args.deepspeed_env)} variable(s)"
    except (LaunchError, DSConfigError, ValueError, FileNotFoundError) as err:
        print(f"launch_check: error: {err}", file=sys.stderr)
        return 2
    print(f"launch_check: ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
