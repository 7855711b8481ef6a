"""TrainConfig: everything one training run needs, read from one YAML (or JSON) file.

Relative paths inside a config file are resolved against that file's folder, so a config and its
data travel together; paths given on the command line are resolved against the current directory.

Global batch with packing
-------------------------
One DeepSpeed micro-batch is one PackedBatch: `packing.rows_per_batch` rows of `packing.max_tokens`
tokens, holding as many whole samples as fit. One optimizer step therefore sees

    rows  = rows_per_batch x grad_accum x world            (DeepSpeed's train_batch_size)
    tokens <= rows x max_tokens                             (efficiency is logged, usually > 0.95)
    samples ~= tokens / mean sample length                  (logged as samples/step)

The paper's global batch is 256 samples (8 GPUs x micro 1 x accumulation 16 x (1 VL + 1 language)).
Its mixture averages roughly 200-250 tokens per sample, so 256 samples are ~51k-64k tokens ~ 16
rows of 4096: 8 GPUs x 1 row x grad_accum 2 (configs/mmgpt_9b.yaml). The log reports samples per
step. The loss is the mean over the supervised tokens of the whole global batch,
so the split into rows, micro-batches and ranks does not change the gradient.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmgpt.configfile import ConfigError, from_dict, plain, read_mapping
from mmgpt.data.packing import PackingConfig
from mmgpt.models.builder import MODEL_PATH_FIELDS, ModelConfig

def _ds_config_dir() -> Path:
    """The bundled DeepSpeed configs: package data `mmgpt.ds_configs` once installed (editable or
    not); in a bare source checkout (never installed), the repository's ds_configs/."""
    spec = importlib.util.find_spec("mmgpt.ds_configs")  # a data-only (namespace) package
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "ds_configs"


DS_CONFIG_DIR = _ds_config_dir()

# Fields (dotted) holding file-system paths: resolved against the config file's folder.
PATH_FIELDS = (*(f"model.{name}" for name in MODEL_PATH_FIELDS), "mixture", "deepspeed", "output_dir")


@dataclass
class ScheduleConfig:
    """Optimiser schedule: AdamW, linear warmup then cosine decay (DeepSpeed WarmupCosineLR).

    `warmup_ratio` applies when `warmup_steps` is None. `max_steps` caps the run (None: `epochs`
    full passes). `grad_accum` is the number of micro-batches (PackedBatches) per rank per step.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 1
    # Peak LR of the gated cross-attention blocks' LoRA (None: `lr`): the demo's images only reach
    # the answers through them, and at `lr` they learn to read the pictures too slowly.
    cross_attn_lr: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:  # also false for nan
            raise ConfigError(f"schedule.lr must be a finite number > 0, got {self.lr}")
        if self.cross_attn_lr is not None and not 0 < self.cross_attn_lr < math.inf:
            raise ConfigError(f"schedule.cross_attn_lr must be a finite number > 0 or null, got {self.cross_attn_lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"schedule.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"schedule.betas must both be in [0, 1), got {list(self.betas)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0 or null, got {self.warmup_steps}")
        if self.epochs < 1 or self.grad_accum < 1:
            raise ConfigError("schedule.epochs and schedule.grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"schedule.max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("schedule.warmup_ratio must be in [0, 1), min_lr_ratio in [0, 1]")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimizer steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_ratio * total_steps)


@dataclass
class EvalConfig:
    """Evaluation during training on records held out of the mixture (mmgpt/train/eval.py).

    `holdout`: per source, a count of usable records or a fraction (0 < f < 1; at least one record)
    taken out before sampling and never trained on; None: no split, no evaluation. `every`: steps
    between evaluations (None: only at the end; there is always one at the end). `enabled: false`
    keeps the split, so the training data stay the same, but evaluates nothing. `samples`: held-out
    prompts rank 0 decodes greedily at each evaluation, up to `max_new_tokens` each, for TensorBoard.
    `accuracy`: sources with short answers whose held-out one-image questions rank 0 answers
    greedily at each evaluation, scored by exact match (`eval/accuracy/<source>`), and again with
    the images moved one question along (`eval/accuracy_shuffled/<source>`: the chance-level control
    that says the answers come from the pictures).
    """

    holdout: int | float | None = None
    every: int | None = None
    enabled: bool = True
    samples: int = 4
    max_new_tokens: int = 64
    accuracy: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.holdout, float) and not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"eval.holdout: a fraction must be in (0, 1), got {self.holdout} (a count is an integer)")
        if isinstance(self.holdout, int) and self.holdout < 1:
            raise ConfigError(f"eval.holdout must be a count >= 1, a fraction in (0, 1) or null, got {self.holdout}")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"eval.every must be >= 1 or null (only at the end), got {self.every}")
        if self.samples < 0 or self.max_new_tokens < 1:
            raise ConfigError("eval.samples must be >= 0 and eval.max_new_tokens >= 1")

    @property
    def active(self) -> bool:
        """Whether this run evaluates at all."""
        return self.enabled and self.holdout is not None


@dataclass
class TrainConfig:
    """One training run. Activation checkpointing is `model.gradient_checkpointing` (non-reentrant).

    `peak_flops` is one device's peak (FLOP/s) for the MFU estimate; None takes the accelerator's
    known bf16 peak, or on CPU the nominal `cpu_peak_flops` (an assumption, logged as such).
    `data_workers`: 1 reads, decodes, tokenises and packs in a background process per rank, two
    accumulation windows ahead; 0 does it in the training process, between steps. `eval`: the
    validation split and evaluation during training (EvalConfig).
    """

    mixture: str
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: str = str(DS_CONFIG_DIR / "zero2.json")
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 1
    max_consecutive_nonfinite: int = 5
    peak_flops: float | None = None
    cpu_peak_flops: float = 1e12
    data_workers: int = 1
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("save_every", "keep_last", "log_every", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("peak_flops", "cpu_peak_flops"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if self.data_workers not in (0, 1):
            raise ConfigError(f"data_workers must be 0 or 1 (one rank's packer is sequential), got {self.data_workers}")

    def check_rows(self, max_length: int) -> None:
        """The mixture's longest sample (`max_length` tokens) fits one packed row."""
        if max_length > self.packing.max_tokens:
            raise ConfigError(f"{self.mixture}: max_length {max_length} > packing.max_tokens "
                              f"{self.packing.max_tokens}: a sample could not fit a row")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        """Read a YAML/JSON file, apply `key.sub=value` overrides (values parsed as YAML)."""
        path = Path(path)
        data = read_mapping(path)
        _resolve_paths(data, path.resolve().parent)
        for item in overrides:
            key, value = _parse_override(item)
            _set_dotted(data, key, value, Path.cwd() if key in PATH_FIELDS else None)
        return from_dict(cls, data, f"{path}")

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        """Write the resolved config (absolute paths): `mmgpt train --config` can rerun it."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. schedule.max_steps=10")
    return key.strip(), yaml.safe_load(raw)


def _get_dotted(data: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _set_dotted(data: dict, key: str, value: Any, base: Path | None) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    if base is not None and isinstance(value, str):
        value = str((base / value).resolve())
    data[parts[-1]] = value


def _resolve_paths(data: dict, base: Path) -> None:
    for key in PATH_FIELDS:
        value = _get_dotted(data, key)
        if isinstance(value, str):
            _set_dotted(data, key, value, base)
