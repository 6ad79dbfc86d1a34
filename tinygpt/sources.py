"""Which source files a stage runs, derived from its imports, so that editing any of them reruns the stage.

Snakemake lists these files as a rule's inputs. Deriving them (instead of listing them by hand in the
rules) means a new helper module, or a shared one such as common.py, can never be forgotten.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "tinygpt"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(module: str) -> Path | None:
    """The file of a `tinygpt.*` module or package, or None when there is no such module."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """Every `tinygpt` module that `path` imports: `import a.b`, `from a.b import c` (c may be a module too),
    and the packages above each of them, whose __init__ runs first."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if module_file(m) is not None}


@cache
def module_sources(module: str) -> tuple[Path, ...]:
    """The files of `module` and of every package module it imports, directly or not, sorted."""
    seen: set[str] = set()
    todo = [module, *(".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1))]
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo.extend(_imported_modules(module_file(name)))
    return tuple(sorted(module_file(m) for m in seen))


ENTRY_POINT = "tinygpt.__main__"  # every rule runs `python -m tinygpt <command>`: this file, then cli.py's dispatch


@cache
def stage_sources(module: str) -> tuple[Path, ...]:
    """The files a rule running `python -m tinygpt <command>` executes: the entry point and the command table
    that dispatches to the stage (cli.py imports stages by name, so no import links them), then `module` and
    everything it imports."""
    return tuple(sorted(set(module_sources(ENTRY_POINT)) | set(module_sources(module))))
