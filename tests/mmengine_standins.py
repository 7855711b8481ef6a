"""Write torch files that pickle mmengine `Config`/`ConfigDict` exactly as the real classes do.

Our own code (no mmengine): `fake_mmengine(style)` registers modules `mmengine`, `mmengine.config`,
`mmengine.config.config` in sys.modules only while a file is saved, so the loader under test never
finds them. Opcodes per style, verified with pickletools against real mmengine:
  legacy  mmengine 0.7.x (0.7.4): ConfigDict (an addict.Dict) via the default protocol-2 path,
          NEWOBJ(ConfigDict, *[(k, v), ...]) + SETITEMS + BUILD(self); Config state a 4-tuple.
  modern  mmengine >= 0.8 (0.10.7): ConfigDict as REDUCE(ConfigDict, ({plain dict},)); Config state a
          6-tuple (cfg_dict, filename, text, env_variables, format_python_code, imported_names: set).
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

MODULE = "mmengine.config.config"
RELEASED_TUNING = dict(
    lora=True,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out", "ff.1", "ff.3"],
    lora_r=16,
    lora_alpha=16,
    lora_dropout=0.0,
    vis=True,
    unfrozen=[],
)  # configs/lora_config.py of open-mmlab/Multimodal-GPT


class ConfigDict(dict):
    """Writer-side ConfigDict: nested dicts become ConfigDicts, as in mmengine."""

    style = "legacy"

    def __init__(self, items: dict | None = None):
        super().__init__()
        for k, v in (items or {}).items():
            self[k] = type(self)(v) if type(v) is dict else v

    def __reduce_ex__(self, protocol: int):
        if type(self).style == "modern":
            return type(self), (dict(self),)
        return object.__reduce_ex__(self, protocol)  # copyreg __newobj__ + dict items + BUILD

    def __getnewargs__(self) -> tuple:
        return tuple(self.items())

    def __getstate__(self) -> ConfigDict:
        return self


class Config:
    """Writer-side Config: NEWOBJ(Config, ()) + BUILD(state tuple)."""

    style = "legacy"

    def __init__(self, cfg_dict: dict, filename: str, text: str):
        self._state = (ConfigDict(cfg_dict), filename, text, {})
        if type(self).style == "modern":
            self._state += (True, set())

    @property
    def tuning_config(self) -> ConfigDict:
        return self._state[0]["tuning_config"]

    def __getstate__(self) -> tuple:
        return self._state


@contextlib.contextmanager
def fake_mmengine(style: str) -> Iterator[None]:
    """Make Config/ConfigDict pickle under their mmengine names, in `style`, for the duration."""
    assert style in ("legacy", "modern")
    ConfigDict.style = Config.style = style
    root, pkg, mod = (types.ModuleType(n) for n in ("mmengine", "mmengine.config", MODULE))
    root.config, pkg.config = pkg, mod
    for cls in (Config, ConfigDict):
        cls.__module__ = MODULE
        setattr(mod, cls.__name__, cls)
    sys.modules.update({"mmengine": root, "mmengine.config": pkg, MODULE: mod})
    try:
        yield
    finally:
        for name in ("mmengine", "mmengine.config", MODULE):
            sys.modules.pop(name)


def lora_config(tuning: dict | None = None) -> Config:
    """What `Config.fromfile(configs/lora_config.py)` holds (call inside `fake_mmengine`)."""
    text = "/configs/lora_config.py\ntuning_config = dict(...)\n"
    return Config({"tuning_config": dict(RELEASED_TUNING if tuning is None else tuning)},
                  "configs/lora_config.py", text)
