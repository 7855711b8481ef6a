"""The DeepSpeed JSON: parse and validate it before anything starts, then fill its "auto" fields.

Why here and not in DeepSpeed: DeepSpeed reports a bad batch split or a typo minutes into a
multi-node start, on every rank, as a stack trace. We check the same file in the launch scripts
(`python -m mmgpt.train.launch_check`) and again in `mmgpt train`, and say in one line what is wrong.

Batch fields: one DeepSpeed micro-batch is one PackedBatch of `rows_per_batch` rows, so
train_micro_batch_size_per_gpu = rows_per_batch, gradient_accumulation_steps = schedule.grad_accum
and train_batch_size = rows x accumulation x world. "auto" takes our value; an explicit number must
agree with it.

Precision: zero2.json accumulates micro-batch gradients in fp32 (data_types.grad_accum_dtype) on
top of bf16 weights and fp32 master weights. zero2_offload.json does not: with the optimizer
offloaded, DeepSpeed 0.19 keeps that fp32 buffer across a skipped (non-finite) step, so every later
step would be skipped too; `load_ds_config` refuses the combination.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

AUTO = "auto"
SUPPORTED_STAGES = (0, 1, 2)  # ZeRO-3 would partition the frozen weights: not supported
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DSConfigError(ValueError):
    """The DeepSpeed JSON cannot be used; the message names the file and the problem."""


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Parse and statically validate a DeepSpeed JSON (syntax, ZeRO stage, precision, batch fields)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DSConfigError(f"{path}: DeepSpeed config not found") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as err:
        raise DSConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(ds, dict):
        raise DSConfigError(f"{path}: expected a JSON object at the top level")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DSConfigError(f"{path}: zero_optimization must be an object")
    for section, parent in (("bf16", ds), ("fp16", ds), ("data_types", ds), ("offload_optimizer", zero)):
        if not isinstance(parent.get(section, {}), dict):
            name = section if parent is ds else f"zero_optimization.{section}"
            raise DSConfigError(f"{path}: {name} must be an object, got {parent[section]!r}"
                                + (' (e.g. {"device": "cpu"})' if section == "offload_optimizer" else ""))
    for section in ("bf16", "fp16"):
        if not isinstance(ds.get(section, {}).get("enabled", False), bool):
            raise DSConfigError(f"{path}: {section}.enabled must be true or false (JSON booleans, no quotes), "
                                f"got {ds[section]['enabled']!r}")
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise DSConfigError(f"{path}: zero_optimization.stage={stage!r} is not supported; use 2 "
                            f"(supported: {SUPPORTED_STAGES}; stage 3 would shard the frozen weights)")
    if _enabled(ds, "bf16") == _enabled(ds, "fp16"):
        raise DSConfigError(f"{path}: enable exactly one of bf16 and fp16 (mmgpt trains in mixed "
                            "precision; its non-finite skip is DeepSpeed's overflow check)")
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    if offload and ds.get("data_types", {}).get("grad_accum_dtype") in ("fp32", "float32"):
        raise DSConfigError(f"{path}: offload_optimizer with data_types.grad_accum_dtype=fp32: in DeepSpeed "
                            "0.19 a skipped non-finite step then leaves NaN in the fp32 gradient buffer and "
                            "every later step is skipped too; drop grad_accum_dtype (see zero2_offload.json)")
    if _enabled(ds, "bf16") and ds["bf16"].get("check_grad_overflow") is False:
        raise DSConfigError(f"{path}: bf16.check_grad_overflow must stay true: it is how a "
                            "non-finite loss skips the update on every rank")
    for key in BATCH_KEYS:
        value = ds.get(key, AUTO)
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DSConfigError(f"{path}: {key} must be a positive integer or \"auto\", got {value!r}")
    return ds


def _enabled(ds: dict, section: str) -> bool:
    return ds.get(section, {}).get("enabled", False) is True  # load_ds_config checked the types


def resolve_batch(ds: dict[str, Any], micro: int, accum: int, world: int, where: str = "") -> dict[str, Any]:
    """A copy of `ds` with the batch fields filled; explicit values must match micro x accum x world."""
    ds = copy.deepcopy(ds)
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world}
    names = {"train_micro_batch_size_per_gpu": "packing.rows_per_batch",
             "gradient_accumulation_steps": "schedule.grad_accum",
             "train_batch_size": "rows_per_batch x grad_accum x world"}
    prefix = f"{where}: " if where else ""
    for key, value in want.items():
        given = ds.get(key, AUTO)
        if given != AUTO and given != value:
            raise DSConfigError(
                f"{prefix}{key}={given} does not match {names[key]} = {value} "
                f"(micro {micro} x accumulation {accum} x world {world} = {micro * accum * world}); "
                f"set it to \"auto\" or make them agree")
        ds[key] = value
    return ds


def fill_optimizer(ds: dict[str, Any], *, lr: float, betas: tuple[float, float], weight_decay: float,
                   total_steps: int, warmup_steps: int, min_lr_ratio: float, cpu: bool) -> dict[str, Any]:
    """A copy of `ds` with "auto" optimizer/scheduler values taken from our schedule.

    A value written in the JSON that disagrees with the training config is an error (as in
    transformers' DeepSpeed integration): otherwise `schedule.lr` would be silently overridden.
    Without optimizer offload, `torch_adam` is set (unless given) so that DeepSpeed uses
    torch.optim.AdamW instead of JIT-building its own Adam (nvcc on every GPU node, minutes on a
    fresh CPU machine; same maths); on CUDA it is torch's fused kernel.
    """
    ds = copy.deepcopy(ds)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    ours = {"lr": lr, "betas": list(betas), "weight_decay": weight_decay}
    for key, value in ours.items():
        given = params.get(key, AUTO)
        if given == AUTO:
            params[key] = value
        elif given != value and not (key == "betas" and list(given) == value):
            raise DSConfigError(f"optimizer.params.{key} = {given!r} in the DeepSpeed JSON disagrees with "
                                f"the training config's schedule.{key} = {value!r}: set it to \"auto\" "
                                "(or to the same value)")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in (None, "none") and str(opt.get("type", "")).lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)
        if not cpu and params["torch_adam"]:
            params.setdefault("fused", True)
    sched = ds.get("scheduler")
    if sched is not None:
        sp = sched.setdefault("params", {})
        for key, value in (("total_num_steps", total_steps), ("warmup_num_steps", max(1, warmup_steps)),
                           ("cos_min_ratio", min_lr_ratio), ("warmup_max_lr", lr)):
            if sp.get(key) == AUTO:
                sp[key] = value
    leftover = [f"{section}.params.{k}" for section in ("optimizer", "scheduler")
                for k, v in (ds.get(section) or {}).get("params", {}).items() if v == AUTO]
    if leftover:
        raise DSConfigError(f"cannot fill \"auto\" for {leftover}: set them explicitly")
    return ds


# Ops DeepSpeed 0.19 JIT-compiles (ninja + a C++ compiler) the first time a run needs them, into
# torch's extension cache; nothing is printed while they build, which can take minutes.
JIT_OPS = {
    "deepspeed_shm_comm": "the CPU ranks' shared-memory communication op",
    "cpu_adam": "the CPU Adam that optimizer offload runs",
}


def _extensions_dir() -> Path:
    """Where torch.utils.cpp_extension builds (and finds) ops: TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions/py<ver>_<accelerator> (the same rule as torch's own)."""
    import os
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
             f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{accel}"


def _prebuilt_ops() -> dict[str, bool]:
    """DeepSpeed's `installed_ops` (ops compiled at install time), read from its generated file
    without importing deepspeed (whose import takes seconds and guesses an accelerator)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return {}
    info = Path(next(iter(spec.submodule_search_locations))) / "git_version_info_installed.py"
    try:
        for node in ast.parse(info.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "installed_ops":
                return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        pass
    return {}


def jit_build_notice(ds: dict[str, Any], cuda: bool) -> str | None:
    """One line saying which op(s) the first DeepSpeed start will compile, why and where, when they
    are neither prebuilt nor in the cache; None when the start will not compile anything."""
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    needed = [name for name, wanted in (("deepspeed_shm_comm", not cuda), ("cpu_adam", offload not in (None, "none")))
              if wanted]
    prebuilt, cache = _prebuilt_ops(), _extensions_dir()
    pending = [name for name in needed if not prebuilt.get(name) and not (cache / name / f"{name}.so").is_file()]
    if not pending:
        return None
    what = ", ".join(f"{name} ({JIT_OPS[name]})" for name in pending)
    return (f"the first DeepSpeed start compiles {what} into {cache}: a few minutes with no output, "
            "once (later starts reuse it)")
