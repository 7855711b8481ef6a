"""What a normal run shows: the warnings and log records of the stack that users cannot act on are
hidden; `--debug` (MMGPT_DEBUG=1, inherited by the ranks a launcher starts) keeps everything.
Shared by the command line, the training ranks and the launch check.
"""
from __future__ import annotations

import logging
import os
import warnings

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
