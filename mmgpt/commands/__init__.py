"""Argument parsers of the commands whose code needs torch/transformers/deepspeed.

`mmgpt --help` must not wait ~10 s for the model stack, so these modules import only the standard
library (and light mmgpt modules) at module level; each parser's `func` imports the code it runs
when it runs (`lazy`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import warnings
from typing import Callable

Command = Callable[[argparse.Namespace], int]


def lazy(target: str) -> Command:
    """`"package.module:function"` as a command function that imports the module only when called."""
    module, name = target.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = target
    return run


DEBUG_ENV = "MMGPT_DEBUG"  # set by `mmgpt --debug`; inherited by the ranks a launcher starts
_NOISY_MODULES = r"(torch|torchvision|transformers|peft|deepspeed|open_clip)(\.|$)"
_ACCELERATOR_NOTICE = "Setting accelerator to CPU"


def _not_accelerator_notice(record: logging.LogRecord) -> bool:
    return _ACCELERATOR_NOTICE not in record.getMessage()


def quiet(debug: bool = False) -> None:
    """Keep a normal run's output to ours: the stack's FutureWarnings (deprecations users cannot
    act on), its UserWarnings, torch's extension-build chatter and DeepSpeed's "Setting accelerator
    to CPU" guess are hidden. `debug` (or MMGPT_DEBUG=1 in the environment) keeps everything."""
    if debug or os.environ.get(DEBUG_ENV):
        os.environ[DEBUG_ENV] = "1"
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=_NOISY_MODULES)
    logging.getLogger("DeepSpeed").addFilter(_not_accelerator_notice)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
