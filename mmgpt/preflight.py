"""Checks of every file a command needs, made before anything costly starts.

A wrong path found after 100 s of loading weights (or on every rank of a DeepSpeed start) costs
minutes and prints a traceback per rank; found here it is one line per problem, all problems at
once (`PreflightError`). Path checks import only the standard library and PIL; `weight_problems`
compares checkpoint shapes with the preset from file headers (safetensors' JSON header, torch zip
files loaded onto the meta device), never reading the tensors of a large file.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmgpt.models.builder import ModelConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
LLAMA_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class PreflightError(ValueError):
    """Problems found before starting; `problems` holds one line each (str joins them with '; ')."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def require(problems: list[str]) -> None:
    """Raise PreflightError if there is any problem."""
    if problems:
        raise PreflightError(problems)


GRADIO_HINT = "the web demo needs gradio, an optional dependency: pip install -e '.[demo]'"


def gradio_problem() -> str | None:
    """GRADIO_HINT when gradio is not installed (looked up, not imported: the check stays light)."""
    return GRADIO_HINT if importlib.util.find_spec("gradio") is None else None


def path_problem(path: str | Path | None, what: str, kind: str = "file") -> str | None:
    """One line if `path` (when given) is not an existing file / directory (`kind`)."""
    if path is None:
        return None
    path = Path(path)
    if kind == "file" and not path.is_file():
        return f"{what} not found: {path}" if not path.exists() else f"{what} is not a file: {path}"
    if kind == "dir" and not path.is_dir():
        return f"{what} not found: {path}" if not path.exists() else f"{what} is not a directory: {path}"
    return None


def image_problem(path: str | Path) -> str | None:
    """One line if `path` is not an image file PIL recognises (reads the header only, decodes nothing)."""
    problem = path_problem(path, "image")
    if problem is not None:
        return problem
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):  # parses the header
            pass
    except (UnidentifiedImageError, OSError) as err:
        return f"{path}: not a usable image ({err})"
    return None


def model_path_problems(cfg: ModelConfig, where: str) -> list[str]:
    """Every missing file or directory a ModelConfig names (`where`: the file the config came from)."""
    problems = [path_problem(cfg.llama_path, f"{where}: model.llama_path (LLaMA directory)", "dir"),
                path_problem(cfg.clip_weights, f"{where}: model.clip_weights"),
                path_problem(cfg.openflamingo_checkpoint, f"{where}: model.openflamingo_checkpoint"),
                path_problem(cfg.lora_checkpoint, f"{where}: model.lora_checkpoint")]
    if cfg.llama_path is not None and Path(cfg.llama_path).is_dir():
        llama = Path(cfg.llama_path)
        if not (llama / "config.json").is_file():
            problems.append(f"{where}: model.llama_path {llama} has no config.json (not a HF LLaMA directory)")
        if not any(any(llama.glob(pattern)) for pattern in LLAMA_WEIGHT_GLOBS):
            problems.append(f"{where}: model.llama_path {llama} has no weights (*.safetensors or *.bin)")
    tokenizer = cfg.tokenizer_path or cfg.llama_path
    if cfg.tokenizer_path is not None:
        problems.append(path_problem(cfg.tokenizer_path, f"{where}: model.tokenizer_path", "dir"))
    if tokenizer is not None and Path(tokenizer).is_dir() and \
            not any((Path(tokenizer) / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{where}: no tokenizer in {tokenizer} (expected one of {list(TOKENIZER_FILES)})")
    return [p for p in problems if p is not None]


def llama_config_problems(llama_path: str, preset_name: str, preset_llama: dict[str, Any]) -> list[str]:
    """The LLaMA directory's config.json against the preset's sizes (the OpenFlamingo and LoRA
    weights of a preset were trained on that LLaMA)."""
    path = Path(llama_path) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"{path}: unreadable ({err})"]
    problems = [f"{path}: {key}={config.get(key)} but preset {preset_name!r} has {preset_llama[key]}"
                for key in ("hidden_size", "num_hidden_layers") if config.get(key) != preset_llama[key]]
    if isinstance(config.get("vocab_size"), int) and config["vocab_size"] > preset_llama["vocab_size"]:
        problems.append(f"{path}: vocab_size={config['vocab_size']} exceeds preset {preset_name!r}'s "
                        f"{preset_llama['vocab_size']}")
    return problems


def _clip_problem(model, path: str) -> str | None:
    """The CLIP file's vision tensors (any form, meta) against the preset's ViT (as load_clip_weights)."""
    from mmgpt.models.clip_forms import read_clip_weights

    weights = read_clip_weights(path, meta=True)
    given = {k: tuple(v.shape) for k, v in weights.visual.items()}
    ours = {k: tuple(v.shape) for k, v in model.vision_encoder.visual.state_dict().items()}
    missing, unexpected = sorted(set(ours) - set(given) - set(weights.absent)), sorted(set(given) - set(ours))
    mismatched = [f"{k}: file {given[k]} vs model {ours[k]}" for k in sorted(set(ours) & set(given))
                  if given[k] != ours[k]]
    parts = [f"{len(items)} {label} (e.g. {items[:2]})" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if items]
    return f"{path}: CLIP vision weights do not fit the preset: " + "; ".join(parts) if parts else None


def meta_model(cfg: ModelConfig) -> tuple[Any, list[str]]:
    """The model `cfg` describes, built on the meta device (no memory, weights not read), or the
    problem that stops it being built (unknown preset, unreadable LLaMA config or tokenizer)."""
    from mmgpt.models.builder import build_model

    try:
        return build_model(replace(cfg, lora_checkpoint=None), meta=True).model, []
    except (ValueError, OSError) as err:
        return None, [f"model (preset {cfg.preset!r}) cannot be built: {' '.join(str(err).split())}"]


def without_files(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with no weights or tokenizer paths: the preset's architecture alone."""
    return replace(cfg, llama_path=None, tokenizer_path=None, clip_weights=None, openflamingo_checkpoint=None,
                   lora_checkpoint=None)


def weight_problems(cfg: ModelConfig, model: Any) -> list[str]:
    """Checkpoint shapes against `model` (`meta_model(cfg)`), from the files' headers.

    Uses the loaders' own key mapping and checks (`pretrained.load_into`, `load_lora`), so what
    passes here loads. Assumes `model_path_problems(cfg)` found nothing.
    """
    from mmgpt.models import pretrained

    problems: list[str | None] = []
    try:
        if cfg.clip_weights:
            problems.append(_clip_problem(model, cfg.clip_weights))
        if cfg.openflamingo_checkpoint:
            pretrained.load_into(model, pretrained.read_meta_state(cfg.openflamingo_checkpoint), cfg.openflamingo_checkpoint,
                                  "OpenFlamingo", pretrained.is_openflamingo_weight)
    except pretrained.WeightsError as err:
        problems.append(str(err))
    if cfg.lora_checkpoint and cfg.lora != "none":
        try:
            pretrained.load_lora(model, cfg.lora_checkpoint)  # a small file: read whole, copied onto meta
        except pretrained.WeightsError as err:
            problems.append(str(err))
    return [p for p in problems if p is not None]


def nearest_existing(path: Path) -> Path:
    """`path` or its closest existing parent (where a not-yet-created directory would go)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def output_dir_problems(out: str | Path, need_bytes: int, what: str = "output_dir") -> list[str]:
    """`out` can be created and written (a probe file), and its file system has `need_bytes` free."""
    base = nearest_existing(Path(out))
    if not base.is_dir():
        return [f"{what} {out}: {base} is not a directory"]
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".mmgpt-write-probe-"):
            pass
    except OSError as err:
        return [f"{what} {out}: not writable ({err.strerror}: {base})"]
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        return [f"{what} {out}: {free / 2**30:.1f} GiB free on {base}, checkpoints need about "
                f"{need_bytes / 2**30:.1f} GiB"]
    return []

