"""Checkpoint files: safe reading and strict, reported loading of OpenFlamingo / MultiModal-GPT weights.

Released files name weights in their own layouts; both sides are reduced to one canonical name:
  - wrappers: `{"model_state_dict": ...}`, `{"state_dict": ...}`, `{"module": ...}`, `module.` prefixes;
  - peft: `lang_encoder.base_model.model.X` -> `lang_encoder.X`, `.base_layer` dropped,
    `lora_A.default.weight` -> `lora_A.weight` (the released MultiModal-GPT layout has no `.default`);
  - OpenFlamingo v1 aliases `lang_encoder.gated_cross_attn_layers.{i}.*` (and v2's
    `lang_encoder.old_decoder_blocks.{i}.*`) point at `lang_encoder.model.layers.{i}.*`;
  - OpenFlamingo stores the ViT as `vision_encoder.*`, we as `vision_encoder.visual.*`.
Loading fails listing every missing required weight (perceiver, cross-attention, LoRA), every unknown
key and every shape mismatch; known-harmless extras (aliases, rotary/position buffers) are reported.
MultiModal-GPT files also pickle an mmengine `tuning_config`; it is read into inert stand-ins (mmengine
is not needed) and its LoRA settings must match the model's.
"""
from __future__ import annotations

import _compat_pickle
import collections
import json
import pickle
import re
import struct
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

WRAPPER_KEYS = ("model_state_dict", "state_dict", "module", "model")
MAX_SAFETENSORS_HEADER = 100 << 20  # larger is not a safetensors file
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}  # the header's names (others: float32 shapes)
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached", "position_ids")
_ALIASES = [
    (re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\."), r"lang_encoder.model.layers.\1.gated_cross_attn_layer."),
    (re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\."), r"lang_encoder.model.layers.\1.decoder_layer."),
]


class WeightsError(ValueError):
    """A weights file that cannot be read safely or does not fit the model; the message names the
    file and every offending key (not `run_layout.CheckpointError`, which is about resuming)."""


@dataclass
class LoadReport:
    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)  # our parameter/buffer names that were set
    harmless: list[str] = field(default_factory=list)  # checkpoint keys skipped on purpose
    settings: dict[str, object] = field(default_factory=dict)  # LoRA settings read from tuning_config

    def __str__(self) -> str:
        extra = f"; ignored {len(self.harmless)} harmless extras (e.g. {self.harmless[:3]})" if self.harmless else ""
        settings = f"; tuning_config {self.settings}" if self.settings else ""
        return f"loaded {len(self.loaded)} tensors from {self.kind} checkpoint {self.path}{extra}{settings}"


class ConfigDict(dict):
    """Inert stand-in for `mmengine.config.config.ConfigDict`: a dict whose items read as attributes.

    mmengine >= 0.8 (0.10.7 verified) pickles it as REDUCE(ConfigDict, ({plain dict},)), which lands in
    dict.__init__; mmengine 0.7.x (0.7.4 verified, an addict.Dict) as NEWOBJ(ConfigDict, *[(k, v), ...])
    (dict.__new__ ignores the pairs) + SETITEMS(items) + BUILD(self).
    """

    def __getattr__(self, name: str) -> object:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setstate__(self, state: object) -> None:
        if state is not self:  # 0.7.x BUILDs with the object itself: its items are already set
            raise pickle.UnpicklingError(f"unexpected ConfigDict state {type(state).__name__}")


class Config:
    """Inert stand-in for `mmengine.config.config.Config`: keeps only the pickled cfg_dict.

    Both versions pickle NEWOBJ(Config, ()) + BUILD(state): 0.7.x with a 4-tuple (cfg_dict, filename,
    text, env_variables), >= 0.8 with a 6-tuple adding format_python_code: bool and imported_names: set.
    """

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) in (4, 6) and isinstance(state[0], ConfigDict)):
            raise pickle.UnpicklingError("unexpected mmengine Config state")
        self.cfg_dict = state[0]

    def __getattr__(self, name: str) -> object:
        if name == "cfg_dict":  # not set yet (no BUILD): nothing to delegate to
            raise AttributeError(name)
        return getattr(self.cfg_dict, name)


# The only globals a fallback load may name: what torch.save writes for tensor state dicts (storage
# types are resolved by torch's own wrapper before find_class), plus the mmengine config classes.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,  # newer mmengine's Config state; written as protocol 2's `__builtin__ set`
    ("mmengine.config.config", "Config"): Config,
    ("mmengine.config.config", "ConfigDict"): ConfigDict,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside `_ALLOWED_GLOBALS`; it was not imported or called."""


_PLAIN = (int, float, str, bool, type(None))


def _check_state_dict_build(state: object) -> None:
    """Admit exactly what `nn.Module.state_dict()` pickles as BUILD: `{"_metadata": {module: {key:
    plain value}}}` (e.g. `{"version": 1}` per module), which only sets that one attribute."""
    metadata = state.get("_metadata") if type(state) is dict and len(state) == 1 else None
    if not (isinstance(metadata, dict) and all(
            type(name) is str and type(entry) is dict
            and all(type(k) is str and type(v) in _PLAIN for k, v in entry.items())
            for name, entry in metadata.items())):
        raise pickle.UnpicklingError("BUILD on OrderedDict with a state other than a state dict's _metadata "
                                     "is not allowed")


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (so BUILD can be intercepted) that resolves globals from the allow-list only."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> object:
        """Look the global up in the allow-list only; nothing is imported."""
        # the Python 2 -> 3 renaming pickle itself applies to protocol < 3 (`__builtin__`, `commands`, ...)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None

    def load_build(self) -> None:
        """BUILD only onto the stand-ins, or a state dict's `_metadata`: on anything else (an allowed
        torch function, a class) it could setattr e.g. `__kwdefaults__` and tamper with every later
        load in the process."""
        target = self.stack[-2]
        if type(target) is collections.OrderedDict:
            _check_state_dict_build(self.stack[-1])
        elif not isinstance(target, (Config, ConfigDict)):
            raise pickle.UnpicklingError(f"BUILD on {type(target).__name__} is not allowed")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(file, **kwargs) -> object:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load's weights-only unpickler refuses SETITEMS on any non-dict class, which mmengine 0.7.x's
# ConfigDict layout needs; so such files go through this pickle module instead (torch still supplies
# persistent_load and the storage types), and safety rests on the exact allow-list above.
_RESTRICTED_PICKLE = types.SimpleNamespace(__name__="mmgpt_restricted_pickle", Unpickler=_RestrictedUnpickler,
                                           load=_restricted_load)


def _load_torch_file(path: Path) -> object:
    """torch.load with weights_only=True; a file it refuses gets one retry with the restricted unpickler."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except RefusedGlobal as err:
        raise WeightsError(f"{path}: refused to unpickle global {err} (only tensors, containers and "
                              "mmengine Config/ConfigDict are allowed); nothing was executed") from None
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{path}: cannot unpickle: {err}") from None


def load_state_file(path: str | Path) -> dict:
    """Read a state dict from safetensors or a torch file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = _load_torch_file(path)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def read_meta_state(path: str | Path) -> dict:
    """A weights file's tensors as meta tensors (names and shapes, no data).

    safetensors: its JSON header. torch files: `torch.load` onto the meta device with
    weights_only (zip files: storages are not read). A file that weights_only refuses (the
    mmengine config pickled in MultiModal-GPT's small LoRA files) goes through the project's
    restricted loader, which reads it whole.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            raw = f.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < size <= MAX_SAFETENSORS_HEADER:
                raise WeightsError(f"{path}: not a safetensors file (header size {size})")
            try:
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise WeightsError(f"{path}: unreadable safetensors header ({err})") from None
        return {name: torch.empty(entry["shape"], device="meta", dtype=_SAFETENSORS_DTYPES.get(entry["dtype"]))
                for name, entry in header.items() if name != "__metadata__"}
    try:
        state = torch.load(str(path), map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        return load_state_file(path)
    except (RuntimeError, EOFError) as err:  # not a torch file at all
        raise WeightsError(f"{path}: not a torch checkpoint ({err})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def refused_by_weights_only(directory: str | Path, err: pickle.UnpicklingError) -> WeightsError:
    """transformers' weights-only read of a model directory refused a file: one line naming the file
    (transformers' `load_state_dict(checkpoint_file)` frame) and torch's reason, not its 10-line advice."""
    tb, shard = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "load_state_dict" and "checkpoint_file" in tb.tb_frame.f_locals:
            shard = Path(str(tb.tb_frame.f_locals["checkpoint_file"])).name
        tb = tb.tb_next
    reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                  " ".join(str(err).split())[:200])
    return WeightsError(f"{directory}: {shard or 'a weights file'} failed the weights-only read ({reason}); "
                        "nothing was executed")


def tensor_summary(state: dict) -> str:
    """`N tensors (float16 xA, float32 xB)`: what a report says about a state dict's contents."""
    dtypes = collections.Counter(str(v.dtype).removeprefix("torch.") for v in state.values() if isinstance(v, Tensor))
    return f"{sum(dtypes.values())} tensors ({', '.join(f'{d} x{n}' for d, n in dtypes.most_common())})"


def unwrap(state: dict) -> dict[str, Tensor]:
    """Strip `{"model_state_dict": ...}`-style wrappers and `module.` prefixes."""
    while len(state) == 1 or any(k in state for k in WRAPPER_KEYS):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if isinstance(value, Tensor):
            out[key] = value
    return out


def canonical(key: str) -> str:
    """One name for the same weight across OpenFlamingo, MultiModal-GPT, peft and this model."""
    key = key.replace("lang_encoder.base_model.model.", "lang_encoder.", 1)
    key = key.replace(".base_layer.", ".")
    key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)
    return key.replace("vision_encoder.visual.", "vision_encoder.", 1)


def _alias_target(key: str) -> str | None:
    for pattern, repl in _ALIASES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def load_into(model: nn.Module, state: dict, source: str, kind: str,
              required: Callable[[str], bool]) -> LoadReport:
    """Copy every checkpoint tensor onto the matching model tensor; fail on anything unaccounted for.

    `required(canonical_name)` says which model tensors the checkpoint must provide.
    """
    state = unwrap(state)
    ours = model.state_dict()
    by_canonical = {canonical(k): k for k in ours}
    given = {canonical(k) for k in state}
    report = LoadReport(path=source, kind=kind)
    plan: dict[str, Tensor] = {}
    unknown, mismatched = [], []
    for key, value in state.items():
        name = canonical(key)
        target = _alias_target(name)
        if target is not None:
            if target in given:  # the same tensor under its primary name: nothing to do
                report.harmless.append(key)
                continue
            name = target
        if name not in by_canonical:
            (report.harmless if name.endswith(HARMLESS_SUFFIXES) else unknown).append(key)
            continue
        our_key = by_canonical[name]
        if tuple(ours[our_key].shape) != tuple(value.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[our_key].shape)}")
            continue
        plan[our_key] = value
    missing = [k for k in ours if required(canonical(k)) and k not in plan]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} required weights: {missing}")
    if unknown:
        problems.append(f"{len(unknown)} keys match nothing in the model: {unknown}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched}")
    if problems:
        raise WeightsError(f"{kind} checkpoint {source} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for our_key, value in plan.items():
            ours[our_key].copy_(value)
    report.loaded = sorted(plan)
    return report


def is_openflamingo_weight(name: str) -> bool:
    """Weights an OpenFlamingo checkpoint must provide: the perceiver and the cross-attention blocks."""
    return (name.startswith("perceiver.") or ".gated_cross_attn_layer." in name) and ".lora_" not in name


def is_lora_weight(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


LORA_SETTINGS = ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def _leaf(module_name: str) -> str:
    """The name MultiModal-GPT's target list uses: the last part, two for Sequential indices (`ff.1`)."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def model_lora_settings(model: nn.Module) -> dict[str, set]:
    """Every value each LoRA setting takes across the model's peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, set] = {k: set() for k in LORA_SETTINGS}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                dropout = module.lora_dropout[adapter]
                out["lora"].add(True)
                out["lora_r"].add(module.r[adapter])
                out["lora_alpha"].add(module.lora_alpha[adapter])
                out["lora_dropout"].add(float(getattr(dropout, "p", 0.0)))  # nn.Identity when 0
                out["lora_target_modules"].add(_leaf(name))
    return out


def tuning_settings(state: dict, source: str) -> dict[str, object]:
    """LoRA settings of a MultiModal-GPT file's `tuning_config` (a Config or its tuning section); {} if none."""
    cfg = state.get("tuning_config")
    if cfg is None:
        return {}
    section = getattr(cfg, "tuning_config", cfg)
    if not isinstance(section, dict):
        raise WeightsError(f"{source}: tuning_config is a {type(section).__name__}, not a config section")
    absent = [k for k in LORA_SETTINGS if k not in section]
    if absent:
        raise WeightsError(f"{source}: tuning_config lacks {absent}")
    return {k: section[k] for k in LORA_SETTINGS}


def _values(key: str, value: object) -> set:
    """A tuning_config value as the set `model_lora_settings` gives for the same key."""
    if key == "lora_target_modules":
        return {_leaf(t) for t in ([value] if isinstance(value, str) else value)}
    return {float(value)} if key == "lora_dropout" else {value}


def check_lora_settings(model: nn.Module, settings: dict[str, object], source: str) -> None:
    """Refuse a LoRA file trained with other settings than the model's preset: its weights would not fit."""
    ours = model_lora_settings(model)
    problems = [f"{key}={value!r} but the model's LoRA preset has {sorted(ours[key])}"
                for key, value in settings.items() if _values(key, value) != ours[key]]
    if problems:
        raise WeightsError(f"{source}: tuning_config disagrees with the model: " + "; ".join(problems))


def load_openflamingo(model: nn.Module, path: str | Path) -> LoadReport:
    """OpenFlamingo v1 `checkpoint.pt` (or a v2-style flat dict) onto the model (before or after LoRA)."""
    return load_into(model, load_state_file(path), str(path), "OpenFlamingo", is_openflamingo_weight)


def load_lora(model: nn.Module, path: str | Path) -> LoadReport:
    """Released MultiModal-GPT LoRA checkpoint (with or without peft's `.default`) onto a LoRA model."""
    if not any(is_lora_weight(k) for k in model.state_dict()):
        raise WeightsError(f"{path}: the model has no LoRA layers to load a LoRA checkpoint into")
    state = load_state_file(path)
    settings = tuning_settings(state, str(path))
    check_lora_settings(model, settings, str(path))
    report = load_into(model, state, str(path), "MultiModal-GPT LoRA", is_lora_weight)
    report.settings = settings
    return report
