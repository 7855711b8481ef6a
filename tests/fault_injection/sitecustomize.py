"""Test-only fault injection for launcher runs (tests/test_launch.py puts this folder on PYTHONPATH).

With MMGPT_TEST_NONFINITE_STEPS="2,3" in the environment, rank 0's loss becomes NaN at those
optimizer steps: a fire drill for the non-finite skip path of every rank the launcher spawns.
Python imports `sitecustomize` at start-up; this one only registers an import hook that patches
`mmgpt.train.loop` when (and if) it is imported, so other processes pay nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

STEPS = {int(s) for s in os.environ.get("MMGPT_TEST_NONFINITE_STEPS", "").split(",") if s.strip()}
TARGET = "mmgpt.train.loop"


def _patch(loop) -> None:
    state = {"step": 0, "rank0": False}
    train_step, packed_loss = loop.Trainer.train_step, loop.packed_loss

    def patched_train_step(self):
        state["step"], state["rank0"] = self.step + 1, self.dist.is_rank0
        return train_step(self)

    def patched_loss(*args, **kwargs):
        out = packed_loss(*args, **kwargs)
        if state["rank0"] and state["step"] in STEPS:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    loop.Trainer.train_step, loop.packed_loss = patched_train_step, patched_loss


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if STEPS:
    sys.meta_path.insert(0, _PatchOnImport())
