"""`mmgpt` command line: one subcommand per job.

The whole command line lives in this package: the dispatcher and the error mapping here, one
module per command. Every module listed in COMMANDS exposes `register(subparsers)`, which adds its
parser and sets `func` (a callable taking the parsed args and returning an exit code): it builds
the typed settings the library takes and calls the library, which never sees the parsed args and
never imports this package. These modules import no torch/transformers/deepspeed at module level
(the heavy code is imported when `func` runs, `lazy`), so `mmgpt --help` is instant. A user's
mistake (missing file, bad YAML/JSON, unknown preset, ...) prints `mmgpt <command>: error:
<message>`, one line per problem, and exits 2; anything else is a bug and keeps its traceback.
`--debug` shows the traceback of user errors too, and the warnings that normal runs hide.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Callable

from mmgpt.logs import quiet

COMMANDS: tuple[str, ...] = (
    "mmgpt.cli.params",  # params
    "mmgpt.cli.data",  # data inspect | sample
    "mmgpt.cli.bench",  # bench packing | ops | train
    "mmgpt.cli.train",  # train
    "mmgpt.cli.plan",  # plan
    "mmgpt.cli.export",  # export
    "mmgpt.cli.chat",  # chat
    "mmgpt.cli.serve",  # serve
    "mmgpt.cli.eval",  # eval
    "mmgpt.cli.weights",  # weights check
)

EXIT_USER_ERROR = 2

# The project's exception types for bad input, by module: a module not imported yet cannot have
# raised its type, so nothing is imported to check (module, class name).
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("mmgpt.configfile", "ConfigError"),
    ("mmgpt.preflight", "PreflightError"),
    ("mmgpt.models.pretrained", "WeightsError"),
    ("mmgpt.run_layout", "CheckpointError"),
    ("mmgpt.data.mixture", "DataError"),
    ("mmgpt.train.ds_config", "DSConfigError"),
    ("mmgpt.train.launch_check", "LaunchError"),
    ("mmgpt.export", "MergeCheckError"),  # a refused merge: nothing was written
    ("mmgpt.export", "ExportTargetError"),
    ("mmgpt.inference.model_dir", "ExportIntegrityError"),
    ("json", "JSONDecodeError"),
    ("yaml", "YAMLError"),
)
FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
               UnicodeDecodeError)

Command = Callable[[argparse.Namespace], int]


def lazy(target: str, settings: str) -> Command:
    """A command that imports `target` ("module:function", a library function) only when called,
    and calls it with the dataclass `settings` (a class of that module) filled from the parsed args
    of the same names: the flags are named after the fields, so the conversion is written once."""
    module, name = target.split(":")

    def run(args: argparse.Namespace) -> int:
        library = importlib.import_module(module)
        return getattr(library, name)(options(getattr(library, settings), args))

    run.__qualname__ = target
    return run


def options(cls: type, args: argparse.Namespace):
    """The dataclass `cls` filled from the parsed args named like its fields."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


class Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows its defaults, and its args say which command they are for."""

    def __init__(self, *args, formatter_class: type = argparse.ArgumentDefaultsHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.set_defaults(command_prog=self.prog)  # the innermost subcommand's prog wins


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mmgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="tracebacks for user errors, and the library warnings normal runs hide")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def _raised_in_mmgpt(err: BaseException) -> bool:
    """A plain ValueError raised by mmgpt's own code is a message about the input; one raised
    inside torch or transformers is a bug (or needs its traceback to be understood)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").split(".")[0] == "mmgpt"


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is a mistake in the user's input (see USER_ERRORS) rather than a bug."""
    named = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)
    return isinstance(err, named + FILE_ERRORS) or (isinstance(err, ValueError) and _raised_in_mmgpt(err))


def error_lines(err: BaseException) -> list[str]:
    """One line per problem (a PreflightError carries several); embedded newlines are folded."""
    return [" ".join(str(problem).split()) for problem in getattr(err, "problems", [err])]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet(args.debug)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise
        for line in error_lines(err):
            print(f"{args.command_prog}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR

