"""The checks a command makes before it loads a model: a wrong `--model`, `--image` or base-weights
path is one line per problem, all at once, instead of a traceback after the weights have loaded.

The path checks come first and need only the standard library and PIL (preflight), so a mistyped
path is reported at once; model_dir, which imports the model stack, is imported after them.
"""
from __future__ import annotations

import sys

from mmgpt.preflight import image_problem, model_path_problems, path_problem, require


def check_model(model: str | None, flag: str = "--model", image: str | None = None, verify: bool = False) -> None:
    """Every path problem of `model` (and `image`), then of the base weights its config names, and an
    export's files against its manifest (sizes; sha256 too with `verify`), saying which on stderr;
    no weights are loaded."""
    require([p for p in (path_problem(model, flag, "dir"), image_problem(image) if image else None) if p])
    if model is not None:
        from mmgpt.inference.model_dir import resolve_source, verify_export

        source = resolve_source(model)
        require(model_path_problems(source.model_config, where=str(source.path)))
        if (checked := verify_export(source, full=verify)) is not None:
            print(f"verified: {checked}", file=sys.stderr)
