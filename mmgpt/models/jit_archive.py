"""Tensors of a TorchScript archive (OpenAI's released `ViT-L-14.pt`) without running TorchScript.

`torch.load(weights_only=True)` refuses TorchScript archives and `torch.jit.load` compiles and can run
the archive's code, so neither is used: the archive's `data.pkl` is read with an unpickler that admits
only what `torch.jit.save` writes for module state — `__torch__.*` module objects (NEWOBJ + BUILD of
their attribute dict), tensors via `torch._utils._rebuild_tensor_v2` over storages named by
persistent id, and `collections.OrderedDict`. Module objects become inert records; nothing in
`code/` is read. The result is the module's state dict (`visual.conv1.weight`, ...), buffers included.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from mmgpt.models.pretrained import WeightsError

_MODULE_PREFIX = "__torch__."


class ScriptModuleRecord:
    """An archived module object: its attribute dict, as BUILD gives it (nothing is called)."""

    def __init__(self) -> None:
        self.attributes: dict[str, object] = {}


def is_torchscript_archive(path: str | Path) -> bool:
    """TorchScript archives are zip files with a `code/` folder (or `constants.pkl`) beside `data.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in archive.namelist())


class _ArchiveUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (BUILD can be intercepted): module records, tensors, OrderedDict only."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, meta: bool):
        super().__init__(file)
        self.archive, self.prefix, self.meta = archive, prefix, meta
        self.storages: dict[str, torch.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> object:
        if module.startswith(_MODULE_PREFIX):
            return ScriptModuleRecord
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name  # resolved to a dtype in persistent_load
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: object) -> torch.TypedStorage:
        """('storage', storage type, key, location, numel): the bytes of `<archive>/data/<key>`."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], str)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            dtype = torch.storage._get_dtype_from_pickle_storage_type(storage_type)
            if self.meta:  # shapes only: the storage bytes are not read
                untyped = torch.UntypedStorage(int(numel) * dtype.itemsize, device="meta")
            else:
                raw = self.archive.read(f"{self.prefix}data/{key}")
                untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self.storages[key] = torch.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]

    def load_build(self) -> None:
        """BUILD only an attribute dict onto a module record: never onto a function or a class."""
        state, target = self.stack[-1], self.stack[-2]
        if not (type(target) is ScriptModuleRecord and type(state) is dict
                and all(type(k) is str for k in state)):
            raise pickle.UnpicklingError(f"BUILD on {type(target).__name__} is not allowed")
        self.stack.pop()
        target.attributes = state

    dispatch[pickle.BUILD[0]] = load_build


def _flatten(record: ScriptModuleRecord, prefix: str, out: dict[str, Tensor]) -> None:
    for name, value in record.attributes.items():
        if isinstance(value, Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptModuleRecord):
            _flatten(value, f"{prefix}{name}.", out)


def read_torchscript_state(path: str | Path, meta: bool = False) -> dict[str, Tensor]:
    """The state dict of the module a TorchScript archive holds, read without executing anything
    (`meta`: tensors on the meta device, for checks that need names, shapes and dtypes only)."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: not a TorchScript archive (expected one <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as file:
            try:
                root = _ArchiveUnpickler(file, archive, prefix, meta).load()
            except (pickle.UnpicklingError, KeyError, ValueError) as err:
                raise WeightsError(f"{path}: cannot read the TorchScript archive's tensors: {err}; "
                                   "nothing was executed") from None
    if not isinstance(root, ScriptModuleRecord):
        raise WeightsError(f"{path}: the TorchScript archive holds a {type(root).__name__}, not a module")
    out: dict[str, Tensor] = {}
    _flatten(root, "", out)
    return out
