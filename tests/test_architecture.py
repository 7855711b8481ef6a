"""Import direction: data flows one way and the packages stay apart.

No import cycle between packages (package level: `mmgpt.train.loop` counts as `mmgpt.train`, a
top-level module as itself), and nothing under mmgpt imports the command line `mmgpt.cli` (the
entry point setup.py names), apart from the CLI itself and the stub DeepSpeed's `--module` starts.
A module named `cli` holds no library logic: the only ones are the `mmgpt.cli` package and that
stub, which defines nothing (it only calls the command), and no module of the package loads the
model stack when imported (its commands import the library when they run).

`mmgpt.models` imports neither `mmgpt.data` nor `mmgpt.train`; `mmgpt.data` imports neither
`mmgpt.models` nor `mmgpt.train`; `mmgpt.inference` does not import `mmgpt.train`. Listed
exceptions: EXCEPTIONS. Shared contracts live in neutral top-level modules (contracts, media,
tokenizer, configfile, run_layout, manifest). Imports inside functions count too. No product module mentions the tests.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmgpt"
FORBIDDEN = {
    "mmgpt.models": ("mmgpt.data", "mmgpt.train"),
    "mmgpt.data": ("mmgpt.models", "mmgpt.train"),
    "mmgpt.inference": ("mmgpt.train",),
}
PACKAGES = ("mmgpt.data", "mmgpt.models", "mmgpt.train", "mmgpt.inference")  # what neutral modules never import
CLI = "mmgpt.cli"  # setup.py: console_scripts mmgpt=mmgpt.cli:main
# Known exceptions, each named: (importing module, imported module or package). They are left out
# of every rule here; each one must still be needed (without it a rule fails).
EXCEPTIONS: set[tuple[str, str]] = set()
NEUTRAL = ("mmgpt.contracts", "mmgpt.media", "mmgpt.tokenizer", "mmgpt.configfile", "mmgpt.run_layout",
           "mmgpt.manifest", "mmgpt.names", "mmgpt.logs", "mmgpt.image_transform")
# `deepspeed --module mmgpt.train.cli` (README, launch/*.sh) starts this module on every rank: it stays,
# as a stub that only calls the command, and is the one module outside the CLI that imports it.
CLI_STUB = ("mmgpt.train.cli", "mmgpt.cli.train")
MODEL_STACK = ("torch", "transformers", "deepspeed", "peft", "open_clip", "gradio")  # `mmgpt --help` loads none


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth, as absolute names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def excepted(mod: str, name: str) -> bool:
    return any(mod == importer and within(name, imported) for importer, imported in {*EXCEPTIONS, CLI_STUB})


def violations(package: str, forbidden: tuple[str, ...], sources: dict[str, set[str]]) -> list[str]:
    return sorted(f"{mod} imports {name}" for mod, names in sources.items() if within(mod, package)
                  for name in names if any(within(name, f) for f in forbidden) and not excepted(mod, name))


def package_of(name: str, top: set[str]) -> str:
    """`mmgpt.X` for any name inside the subpackage or top-level module X; `mmgpt` otherwise."""
    parts = name.split(".")
    return f"mmgpt.{parts[1]}" if len(parts) > 1 and parts[1] in top else "mmgpt"


def package_graph(sources: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> the other mmgpt packages it imports (the listed exceptions left out)."""
    top = {mod.split(".")[1] for mod in sources if "." in mod}
    graph: dict[str, set[str]] = {}
    for mod, names in sources.items():
        for name in names:
            if within(name, "mmgpt") and not excepted(mod, name):
                here, there = package_of(mod, top), package_of(name, top)
                if here != there:
                    graph.setdefault(here, set()).add(there)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return []

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return []


def cli_importers(sources: dict[str, set[str]]) -> list[str]:
    return sorted(f"{mod} imports {name}" for mod, names in sources.items() if not within(mod, CLI)
                  for name in names if within(name, CLI) and not excepted(mod, name))


def all_violations(sources: dict[str, set[str]]) -> list[str]:
    """What every rule of this file reports, together."""
    found = [v for package, forbidden in FORBIDDEN.items() for v in violations(package, forbidden, sources)]
    found += [v for module in NEUTRAL for v in violations(module, PACKAGES, sources)]
    cycle = find_cycle(package_graph(sources))
    return found + cli_importers(sources) + ([" -> ".join(cycle)] if cycle else [])



def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def on_import(path: Path) -> tuple[set[str], set[str]]:
    """(what importing `path` imports at once, the names it defines): its module-level statements,
    not function bodies nor `if TYPE_CHECKING:` blocks."""
    names: set[str] = set()
    defined: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.update({node.module} | {f"{node.module}.{alias.name}" for alias in node.names})
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update(t.id for t in targets if isinstance(t, ast.Name))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return names, defined


def loaded_by(module: str, top: dict[str, set[str]]) -> set[str]:
    """The packages outside mmgpt that importing `module` loads: through the mmgpt modules it (and
    every package above it) imports at module level, transitively."""
    def with_parents(name: str) -> list[str]:
        parts = name.split(".")
        return [p for i in range(1, len(parts) + 1) if (p := ".".join(parts[:i])) in top]

    seen: set[str] = set()
    todo, outside = with_parents(module), set()
    while todo:
        if (mod := todo.pop()) in seen:
            continue
        seen.add(mod)
        for name in top[mod]:
            if within(name, "mmgpt"):
                todo += with_parents(name)
            else:
                outside.add(name.split(".")[0])
    return outside


def cli_logic(top: dict[str, set[str]], defined: dict[str, set[str]]) -> list[str]:
    """Library logic where the command line is: another module named `cli`, a stub that does more
    than call the command, a command module that loads the model stack when imported."""
    found = [f"{mod} is a cli module outside {CLI}" for mod in sorted(top)
             if mod.split(".")[-1] == "cli" and not within(mod, CLI) and mod != CLI_STUB[0]]
    stub, command = CLI_STUB
    if defined.get(stub) or not top.get(stub, set()) <= {"sys", command, f"{command}.main"}:
        found.append(f"{stub} does more than call {command}.main")
    return found + [f"{mod} loads {pkg} when imported" for mod in sorted(top) if within(mod, CLI)
                    for pkg in sorted(loaded_by(mod, top) & set(MODEL_STACK))]


SOURCES = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
ON_IMPORT = {module_name(p): on_import(p) for p in PACKAGE.rglob("*.py")}
TOP = {mod: names for mod, (names, _) in ON_IMPORT.items()}
DEFINED = {mod: defined for mod, (_, defined) in ON_IMPORT.items()}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    assert violations(package, FORBIDDEN[package], SOURCES) == []


def test_the_check_sees_a_violation():
    """The rule has teeth: a models module importing the data package is reported."""
    fake = {**SOURCES, "mmgpt.models.fake": {"mmgpt.data.packing"}}
    assert violations("mmgpt.models", FORBIDDEN["mmgpt.models"], fake) == ["mmgpt.models.fake imports mmgpt.data.packing"]


def test_no_import_cycle_between_packages():
    assert find_cycle(package_graph(SOURCES)) == []


def test_the_cycle_check_sees_a_cycle():
    """inference imports models; a models module importing inference closes a cycle."""
    fake = {**SOURCES, "mmgpt.models.fake": {"mmgpt.inference.generation"}}
    cycle = find_cycle(package_graph(fake))
    assert cycle[0] == cycle[-1] and {"mmgpt.models", "mmgpt.inference"} <= set(cycle)


def test_nothing_under_mmgpt_imports_the_cli():
    assert cli_importers(SOURCES) == []


def test_the_cli_check_sees_an_importer():
    fake = {**SOURCES, "mmgpt.inference.fake": {"mmgpt", "mmgpt.cli"}}
    assert cli_importers(fake) == ["mmgpt.inference.fake imports mmgpt.cli"]


def test_every_exception_is_still_needed(monkeypatch):
    """An exception the code no longer needs is deleted, not kept as a silent allowance."""
    assert all_violations(SOURCES) == []
    listed, unneeded = frozenset(EXCEPTIONS), []
    for pair in sorted(listed):
        monkeypatch.setattr(sys.modules[__name__], "EXCEPTIONS", listed - {pair})
        if not all_violations(SOURCES):
            unneeded.append(pair)
    assert unneeded == []


def test_neutral_modules_import_no_package():
    for module in NEUTRAL:
        assert violations(module, PACKAGES, SOURCES) == []


def test_no_product_module_mentions_the_tests():
    """Test knobs and fixtures live in tests/: no product module is shaped around them."""
    mentions = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                if re.search(r"\btests/|\bpytest\b|\bunit tests?\b|\btest_[a-z]|\bconftest\b|\bthe tests\b",
                             p.read_text(encoding="utf-8"), re.IGNORECASE)]
    assert mentions == []


def test_a_module_named_cli_holds_no_library_logic():
    assert cli_logic(TOP, DEFINED) == []


def test_the_cli_logic_check_sees_violations():
    """A parser module outside the package, a stub with a function, a command module importing the
    library at module level (directly, or through an mmgpt module that does) are each reported."""
    fake_top = {**TOP, "mmgpt.data.cli": {"argparse"}, "mmgpt.cli.fake": {"mmgpt.inference.chat"},
                "mmgpt.cli.fake2": {"torch"}}
    fake_defined = {**DEFINED, CLI_STUB[0]: {"validate"}}
    found = cli_logic(fake_top, fake_defined)
    assert "mmgpt.data.cli is a cli module outside mmgpt.cli" in found
    assert "mmgpt.train.cli does more than call mmgpt.cli.train.main" in found
    assert {"mmgpt.cli.fake loads torch when imported", "mmgpt.cli.fake loads transformers when imported",
            "mmgpt.cli.fake2 loads torch when imported"} <= set(found)
