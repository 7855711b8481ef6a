"""Import direction: data flows one way and the packages stay apart.

`mmgpt.models` imports neither `mmgpt.data` nor `mmgpt.train`; `mmgpt.data` imports neither
`mmgpt.models` nor `mmgpt.train`; `mmgpt.inference` does not import `mmgpt.train` (one listed
exception, EXCEPTIONS). Shared contracts live in neutral top-level modules (contracts, media,
tokenizer, configfile, run_layout, manifest). Imports inside functions count too. No product module mentions the tests.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmgpt"
FORBIDDEN = {
    "mmgpt.models": ("mmgpt.data", "mmgpt.train"),
    "mmgpt.data": ("mmgpt.models", "mmgpt.train"),
    "mmgpt.inference": ("mmgpt.train",),
}
# Known exceptions, each named: (importing module, imported module). Every one must still occur.
EXCEPTIONS = {
    # issue 19: a training run's config.yaml is read through TrainConfig, which moved under train/;
    # it leaves when the run/export layout gets its one module.
    ("mmgpt.inference.model_dir", "mmgpt.train.config"),
}
NEUTRAL = ("mmgpt.contracts", "mmgpt.media", "mmgpt.tokenizer", "mmgpt.configfile", "mmgpt.run_layout",
           "mmgpt.manifest")


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
    return any(mod == importer and within(name, imported) for importer, imported in EXCEPTIONS)


def violations(package: str, forbidden: tuple[str, ...], sources: dict[str, set[str]]) -> list[str]:
    return sorted(f"{mod} imports {name}" for mod, names in sources.items() if within(mod, package)
                  for name in names if any(within(name, f) for f in forbidden) and not excepted(mod, name))


SOURCES = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    assert violations(package, FORBIDDEN[package], SOURCES) == []


def test_the_check_sees_a_violation():
    """The rule has teeth: a models module importing the data package is reported."""
    fake = {**SOURCES, "mmgpt.models.fake": {"mmgpt.data.packing"}}
    assert violations("mmgpt.models", FORBIDDEN["mmgpt.models"], fake) == ["mmgpt.models.fake imports mmgpt.data.packing"]


def test_every_exception_still_occurs():
    """A listed exception that the code no longer needs is deleted, not kept as a silent allowance."""
    stale = [pair for pair in EXCEPTIONS
             if not any(within(name, pair[1]) for name in SOURCES.get(pair[0], ()))]
    assert stale == []


def test_neutral_modules_import_no_package():
    for module in NEUTRAL:
        assert violations(module, ("mmgpt.data", "mmgpt.models", "mmgpt.train", "mmgpt.inference"), SOURCES) == []


def test_no_product_module_mentions_the_tests():
    """Test knobs and fixtures live in tests/: no product module is shaped around them."""
    mentions = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                if re.search(r"\btests/|\bpytest\b|\bunit tests?\b|\btest_[a-z]|\bconftest\b|\bthe tests\b",
                             p.read_text(encoding="utf-8"), re.IGNORECASE)]
    assert mentions == []
