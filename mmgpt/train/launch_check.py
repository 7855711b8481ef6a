"""Pre-launch validation: hostfile, DeepSpeed JSON, train config and every file the run needs.

The launch scripts run `python -m mmgpt.train.launch_check ...` first. Every problem found prints
one line naming the file (and line) and what is wrong, all of them at once, and the exit code is 2,
so nothing is started on any node: the LLaMA directory and tokenizer, CLIP / OpenFlamingo / LoRA
weights (their tensor shapes against the preset, read from the file headers), the mixture file, its
source files and image roots, at least one usable sample (a run that trains nothing is refused
here, not after the launch), and a writable output_dir with room for the checkpoints.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mmgpt.logs import quiet
from mmgpt.preflight import (PreflightError, llama_config_problems, meta_model, model_path_problems,
                             output_dir_problems, path_problem, require, weight_problems, without_files)
from mmgpt.train.ds_config import DSConfigError, jit_build_notice, load_ds_config, resolve_batch

_HOST_LINE = re.compile(r"^(?P<host>[^\s=]+)\s+slots=(?P<slots>\S+)$")
# DeepSpeed checkpoint bytes per trainable parameter: bf16 weight + fp32 master + Adam's two fp32
# moments, plus the adapter/ copy; checkpoints kept: keep_last + the one being written.
CHECKPOINT_BYTES_PER_PARAM = 2 + 4 + 8 + 4


class LaunchError(ValueError):
    """An input that must be fixed before launching (one line, names file and line)."""


def _read_text(path: Path, what: str) -> str:
    """A UTF-8 text file; errors name it (a decode error alone says neither file nor line)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LaunchError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise LaunchError(f"{path}:{line}: {what} is not UTF-8 text (byte {err.start})") from None


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
    for number, raw in enumerate(_read_text(path, "hostfile").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise LaunchError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        name, slots = match["host"], match["slots"]
        if not (slots.isascii() and slots.isdigit()) or int(slots) < 1:  # "²".isdigit() is True
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
    lines = _read_text(path, ".deepspeed_env").splitlines()
    for number, line in enumerate(lines, start=1):
        name, sep, _ = line.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise LaunchError(f"{path}:{number}: expected NAME=VALUE (no blank lines or comments: "
                              f"DeepSpeed reads every line), got {line!r}")
    return len(lines)


def mixture_problems(path: str, where: str) -> list[str]:
    """The mixture parses (YAML/JSON, typed) and every source file and image root exists."""
    from mmgpt.data.mixture import MixtureConfig

    missing = path_problem(path, f"{where}: mixture file")
    if missing is not None:
        return [missing]
    try:
        mixture = MixtureConfig.load(path)
    except (ValueError, FileNotFoundError) as err:  # ConfigError included
        return [" ".join(str(err).split())]
    problems = []
    for src in mixture.sources:
        problems.append(path_problem(src.path, f"{path}: source {src.name!r}: file"))
        problems.append(path_problem(src.image_root, f"{path}: source {src.name!r}: image_root", "dir"))
    return [p for p in problems if p is not None]


def data_problems(cfg) -> list[str]:
    """At least one selected sample tokenises within `max_length` and fits a row: a run without one
    would end at once with an untrained adapter. The mixture is built as training builds it (the
    run's tokenizer, holdout, image limit) and the scan stops at the first usable sample, so a
    normal mixture costs its screening plus one tokenisation; an unusable one says why."""
    from collections import Counter

    from mmgpt.data.conversation import tokenize
    from mmgpt.data.mixture import Mixture, MixtureConfig
    from mmgpt.models.builder import preset_image_size, tokenizer_path
    from mmgpt.tokenizer import load_tokenizer

    path = tokenizer_path(cfg.model)
    if path is None:  # a preset without a bundled tokenizer and no llama_path: reported already
        return []
    try:
        mixture_cfg = MixtureConfig.load(cfg.mixture)
        cfg.check_rows(mixture_cfg.max_length)
        mixture = Mixture(mixture_cfg, load_tokenizer(path), preset_image_size(cfg.model.preset),
                          max_images=cfg.packing.max_images_per_row, holdout=cfg.eval.holdout)
    except (ValueError, OSError) as err:  # ConfigError included; on_error: raise stops at a bad record
        return [" ".join(str(err).split())]
    reasons: Counter = Counter()
    for i in range(len(mixture)):
        try:
            sample = tokenize(mixture.conversation(i), mixture.tokenizer, mixture_cfg.max_length)
        except (TypeError, ValueError, OverflowError, RecursionError):
            sample = "bad_text"
        if not isinstance(sample, str):
            return []
        reasons[sample] += 1
    screened = {name: dict(r.dropped) for name, r in mixture.report.sources.items() if r.dropped}
    return [f"{cfg.mixture}: no usable sample: {len(mixture)} selected, dropped at tokenisation "
            f"{dict(reasons)} (max_length {mixture_cfg.max_length}); dropped before sampling {screened}"]


def run_problems(cfg, where: str) -> list[str]:
    """Everything a TrainConfig needs on disk; `where` names the config file in each line."""
    from mmgpt.models.builder import get_preset

    problems = model_path_problems(cfg.model, where)
    usable = not problems
    if usable and cfg.model.llama_path is not None:
        problems += llama_config_problems(cfg.model.llama_path, cfg.model.preset, get_preset(cfg.model.preset).llama)
    model, build_problems = meta_model(cfg.model if usable else without_files(cfg.model))
    problems += build_problems
    if model is not None and usable:
        problems += weight_problems(cfg.model, model)
    mixture = mixture_problems(cfg.mixture, where)
    problems += mixture or (data_problems(cfg) if usable else [])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else 0
    need = trainable * CHECKPOINT_BYTES_PER_PARAM * (cfg.keep_last + 1)
    return problems + output_dir_problems(cfg.output_dir, need)


def check(config: str | Path | None, ds_config: str | Path | None, world: int | None,
          overrides: list[str] = ()) -> tuple[str, dict | None]:
    """Validate the train config, the files it names and the DeepSpeed JSON for `world` ranks
    (None: unknown, the batch split is not checked); return a summary line and the DeepSpeed
    config (None if there is none), or raise PreflightError listing every problem."""
    problems: list[str] = []
    micro, accum = 1, None
    if config is not None:
        from mmgpt.train.config import TrainConfig  # heavy import (transformers), only when asked

        cfg = TrainConfig.load(config, overrides)  # a config that does not load: nothing else to check
        problems += run_problems(cfg, str(config))
        micro, accum = cfg.packing.rows_per_batch, cfg.schedule.grad_accum
        ds_config = ds_config or cfg.deepspeed
    summary, ds = f"world {world}", None
    if ds_config is not None:
        try:
            ds = load_ds_config(ds_config)
            summary = _batch_summary(ds, ds_config, micro, accum, world)
        except DSConfigError as err:
            problems.append(str(err))
    require(problems)
    return summary, ds


def _batch_summary(ds: dict, ds_config: str | Path, micro: int, accum: int | None, world: int | None) -> str:
    if accum is None:  # no train config: the JSON's own numbers must be consistent
        accum = ds.get("gradient_accumulation_steps", "auto")
        micro = ds.get("train_micro_batch_size_per_gpu", "auto")
        if "auto" in (accum, micro):
            return f"world {world}; {ds_config}: batch fields are filled from the train config"
    if world is None:
        return "world unknown"
    ds = resolve_batch(ds, micro, accum, world, where=str(ds_config))
    return (f"world {world}; global batch {micro} row(s) x accumulation {accum} x {world} ranks "
            f"= {ds['train_batch_size']} rows per step")


def memory_plan_problems(config: str, overrides: list[str], world: int, gpu: str) -> list[str]:
    """Print the memory plan of the run (and a warning naming the setting to change when it will
    not fit); a config or card that cannot be planned is a problem."""
    from mmgpt.train.config import TrainConfig
    from mmgpt.train import memory_plan

    try:
        cfg = TrainConfig.load(config, overrides)
        result = memory_plan.plan(cfg.model, cfg.packing.max_tokens, world, gpu, load_ds_config(cfg.deepspeed))
    except (ValueError, FileNotFoundError) as err:  # ConfigError / DSConfigError / a bad --gpu
        return [" ".join(str(err).split())]
    for line in memory_plan.plan_lines(result):
        print(f"launch_check: plan: {line}", flush=True)
    note = memory_plan.advice(result)
    print(f"launch_check: warning: {note}" if note is not None else f"launch_check: plan: {memory_plan.verdict(result)}",
          flush=True)
    return []


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
    parser.add_argument("--gpu", help="also show the memory plan (mmgpt plan) for this card: a100-40gb | "
                                      "a100-80gb | h100-80gb | h200 | <N>GiB")
    args = parser.parse_args(argv)
    quiet()
    problems: list[str] = []
    world = summary = ds = None
    try:
        world = world_size(args.hostfile, args.num_gpus, args.num_nodes)
    except LaunchError as err:
        problems.append(str(err))
    try:
        summary, ds = check(args.config, args.ds_config, world, args.overrides)
    except PreflightError as err:
        problems += err.problems
    except (ValueError, FileNotFoundError) as err:  # a train config that does not load
        problems.append(" ".join(str(err).split()))
    if args.deepspeed_env:
        try:
            summary = f"{summary}; {args.deepspeed_env}: {check_deepspeed_env(args.deepspeed_env)} variable(s)"
        except LaunchError as err:
            problems.append(str(err))
    if args.gpu and args.config:
        problems += memory_plan_problems(args.config, args.overrides, world or 1, args.gpu)
    for problem in problems:
        print(f"launch_check: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    if ds is not None:
        import torch

        notice = jit_build_notice(ds, cuda=torch.cuda.is_available())
        if notice is not None:
            print(f"launch_check: note: {notice}", flush=True)
    print(f"launch_check: ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
