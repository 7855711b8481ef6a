"""What a checkpoint was trained with, and which differences a resume may make.

Every checkpoint holds `trained_with.json` (listed in its manifest): the settings that shape the
training (the TrainConfig, the mixture's content, the DeepSpeed precision and ZeRO stage, the world
size) as flat dotted fields, their sha256 (`config_hash`), and the safe changes earlier resumes
made. On `--resume auto` every field that differs is classified:

- safe: it takes effect from the next step (a new peak lr or schedule length: the LR schedule is
  recomputed at the current step; `save_every`, eval cadence, ...). It is logged in one line and
  recorded in the `changes` of every later checkpoint.
- refused, in one line naming the field and why: anything that changes which samples come in
  which order (mixture sources, seed, sample counts, packing, grad_accum, holdout), the world size
  (each rank's data position is stored; sample i goes to rank i mod world), the model and LoRA the
  weights belong to, and the optimizer settings the restored Adam state keeps (betas, weight decay).
- a field not listed below is refused as "not known to be safe", so a new setting is never
  silently carried over.

Locations (output_dir, the mixture and DeepSpeed file paths) are not compared: their contents are.
The data files themselves are named by path, not hashed (a mixture of millions of records).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from mmgpt.configfile import plain
from mmgpt.run_layout import TRAINED_WITH, CheckpointError

_SCHEDULE = "the LR schedule is recomputed with it and continues at the current step"
_FROM_NOW = "takes effect from now on; the training maths are unchanged"
SAFE: dict[str, str] = {
    "schedule.lr": "the new peak lr applies from the next step, at the schedule's current position",
    "schedule.max_steps": _SCHEDULE, "schedule.epochs": _SCHEDULE, "schedule.warmup_steps": _SCHEDULE,
    "schedule.warmup_ratio": _SCHEDULE, "schedule.min_lr_ratio": _SCHEDULE,
    "save_every": _FROM_NOW, "keep_last": _FROM_NOW, "log_every": _FROM_NOW, "max_consecutive_nonfinite": _FROM_NOW,
    "data_workers": _FROM_NOW, "peak_flops": _FROM_NOW, "cpu_peak_flops": _FROM_NOW, "eval.every": _FROM_NOW,
    "eval.enabled": _FROM_NOW, "eval.samples": _FROM_NOW, "eval.max_new_tokens": _FROM_NOW,
    "model.gradient_checkpointing": "compute only (the same maths, float rounding apart)",
    "model.attn_backend": "compute only (the same maths, float rounding apart)",
}
_ORDER = "the saved data position would be applied to a different sample order"
REFUSED: dict[str, str] = {  # by prefix: the first matching entry names the reason
    "world": "each rank's data position is stored (sample i goes to rank i mod world): resume with the "
             "same number of ranks",
    "mixture.seed": f"it is the data order seed: {_ORDER}",
    "mixture.sources": f"the mixture's sources changed: {_ORDER}",
    "mixture.": f"it changes which samples the mixture holds: {_ORDER}",
    "packing.": f"it changes how the data pack into rows: {_ORDER}",
    "schedule.grad_accum": f"it changes the samples of a step: {_ORDER}",
    "eval.holdout": f"it changes which records are held out of training: {_ORDER}",
    "schedule.betas": "the restored Adam state keeps the old value",
    "schedule.weight_decay": "the restored Adam state keeps the old value",
    "model.": "the checkpoint's weights belong to the model and LoRA it was trained with",
    "deepspeed.": "the optimizer state was written with this precision / ZeRO layout",
}
_LOCATIONS = ("output_dir", "mixture", "deepspeed")  # paths; their contents are compared instead


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def build(cfg: Any, mixture_cfg: Any, ds: dict[str, Any], world: int) -> dict[str, Any]:
    """The record of a run: TrainConfig + mixture + DeepSpeed precision/ZeRO + world, flattened."""
    train = {k: v for k, v in cfg.to_dict().items() if k not in _LOCATIONS}
    mixture = plain(dataclasses.asdict(mixture_cfg))
    mixture["sources"] = json.dumps(mixture["sources"], sort_keys=True)  # one field: named in messages
    zero = ds.get("zero_optimization", {})
    speed = {"zero_stage": zero.get("stage", 0), "bf16": ds.get("bf16", {}).get("enabled", False),
             "fp16": ds.get("fp16", {}).get("enabled", False),
             "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none")}
    fields = _flatten({**train, "mixture": mixture, "deepspeed": speed, "world": world})
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return {"format": 1, "config_hash": digest, "fields": fields, "changes": []}


def write(step_dir: Path, record: dict[str, Any]) -> None:
    (step_dir / TRAINED_WITH).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


def read(step_dir: Path) -> dict[str, Any] | None:
    """The record of a checkpoint; None for one written before records existed."""
    path = step_dir / TRAINED_WITH
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); refusing to resume") from err
    if not (isinstance(record, dict) and isinstance(record.get("fields"), dict)
            and isinstance(record.get("changes"), list)):
        raise CheckpointError(f"{path} has no `fields` mapping and `changes` list; refusing to resume")
    return record


def _sources(value: str) -> list[str]:
    return [src["name"] for src in json.loads(value)]


def _refusal(tag: str, field: str, old: Any, new: Any) -> str:
    reason = next((why for prefix, why in REFUSED.items() if field == prefix or field.startswith(prefix)),
                  "it is not known to be safe to change on resume")
    if field == "mixture.sources":
        before, after = _sources(old), _sources(new)
        gone, added = [s for s in before if s not in after], [s for s in after if s not in before]
        shown = "; ".join(filter(None, (gone and f"removed {gone}", added and f"added {added}"))) or \
            "same names, other files/counts/options"
        return f"checkpoint {tag}: mixture sources changed ({shown}): {reason}; refusing to resume"
    return (f"checkpoint {tag}: {field} was {old!r} when it was trained, now {new!r}: {reason}; "
            "refusing to resume (restore the old value, or start a new output_dir)")


def classify(previous: dict[str, Any], current: dict[str, Any], tag: str, step: int) -> list[dict[str, Any]]:
    """The safe changes from `previous` to `current` (each {step, field, old, new, effect});
    raises CheckpointError (one line) on the first refused one."""
    old, new = previous["fields"], current["fields"]
    changes = []
    for field in sorted(old.keys() | new.keys()):
        before, after = old.get(field), new.get(field)
        if before == after:
            continue
        if field not in SAFE:
            raise CheckpointError(_refusal(tag, field, before, after))
        changes.append({"step": step, "field": field, "old": before, "new": after, "effect": SAFE[field]})
    return changes


def resume(step_dir: Path, current: dict[str, Any], step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`current` with the checkpoint's change history plus today's safe changes, and today's changes.

    Raises CheckpointError naming the first refused field. A checkpoint without a record (written
    before records existed) gives back `current` and no changes: there is nothing to compare with.
    """
    previous = read(step_dir)
    if previous is None:
        return current, []
    changes = classify(previous, current, step_dir.name, step)
    return {**current, "changes": previous["changes"] + changes}, changes
