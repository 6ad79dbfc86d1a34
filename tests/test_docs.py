"""The documentation travels with the repo: every document that the code, tests, workflow files, notebooks or
README name exists in the repo (a cited section too), and every relative link in README.md and docs/*.md
leads to an existing file and heading."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()  # its examples of broken references are strings on purpose: not scanned
# What a clone holds and names documents from; build outputs, data and virtual environments are not scanned.
TOP_FILES = ("README.md", "Snakefile", "config.yaml", "pyproject.toml")
FOLDERS = ("tinygpt", "tests", "workflow", "notebooks", "bench", "tools", "docs", ".ci")
TEXT_SUFFIXES = {".py", ".smk", ".yaml", ".yml", ".toml", ".ipynb", ".md", ".rst", ".sh", ""}

# A path ending in .md (with an optional #section), or any path under docs/; not the tail of a URL or a word.
DOCUMENT = re.compile(r"(?<![\w./:-])((?:[\w.-]+/)*[\w.-]+\.md)(?:#([\w-]+))?\b")
DOCS_PATH = re.compile(r"(?<![\w./:-])(docs/[\w./-]*[\w-])(?:#([\w-]+))?")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def scanned_files(root: Path) -> list[Path]:
    files = [root / name for name in TOP_FILES if (root / name).is_file()]
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            parts = path.relative_to(root).parts
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in parts \
                    and parts[:2] != ("tests", "data") and path.resolve() != SELF:
                files.append(path)
    return files


def python_prose(text: str) -> tuple[str, str]:
    """(comments and docstrings, every string literal) of Python source. Documents are cited in prose; a
    string literal may also be a file name a test creates (`c.md`), so only docs/ paths count there."""
    prose = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    strings = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            prose.append(ast.get_docstring(node, clean=False) or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append(node.value)
    return "\n".join(prose), "\n".join(strings)


def notebook_text(text: str) -> str:
    return "\n".join("".join(cell.get("source", "")) for cell in json.loads(text).get("cells", []))


def references(path: Path) -> list[tuple[str, str]]:
    """(document path, section or "") for every document `path` names."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        prose, strings = python_prose(text)
        found = DOCUMENT.findall(prose) + DOCS_PATH.findall(prose) + DOCS_PATH.findall(strings)
    else:
        text = notebook_text(text) if path.suffix == ".ipynb" else text
        found = DOCUMENT.findall(text) + DOCS_PATH.findall(text)
    return sorted({(name, section or "") for name, section in found})


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    text = FENCE.sub("", markdown.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def resolve(name: str, source: Path, root: Path) -> Path | None:
    """The file a cited name means: beside the citing file, from the repo root, or in docs/."""
    for base in (source.parent, root, root / "docs"):
        if (base / name).exists():
            return base / name
    return None


def broken_references(root: Path) -> list[str]:
    problems = []
    for path in scanned_files(root):
        for name, section in references(path):
            where = f"{path.relative_to(root)} names {name}" + (f"#{section}" if section else "")
            target = resolve(name, path, root)
            if target is None:
                problems.append(f"{where}, which is not in the repo")
            elif section and target.suffix == ".md" and section not in anchors(target):
                problems.append(f"{where}, but {target.relative_to(root)} has no such section")
    return problems


def markdown_links(markdown: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", markdown.read_text(encoding="utf-8")))
    return LINK.findall(text)


def broken_links(root: Path) -> list[str]:
    problems = []
    for markdown in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if not markdown.is_file():
            continue
        for link in markdown_links(markdown):
            if re.match(r"[a-z][a-z0-9+.-]*:", link, re.I):  # https:, mailto:, ...
                continue
            target_name, _, section = link.partition("#")
            target = (markdown.parent / target_name).resolve() if target_name else markdown
            where = f"{markdown.relative_to(root)} links to {link}"
            if not target.exists():
                problems.append(f"{where}, which does not exist")
            elif section and target.suffix == ".md" and section not in anchors(target):
                problems.append(f"{where}, but {target.name} has no such section")
    return problems


# ---------------------------------------------------------------------------------------------- the repo


def test_every_named_document_exists():
    assert broken_references(ROOT) == []


def test_every_relative_link_in_the_docs_resolves():
    assert broken_links(ROOT) == []


def test_the_docs_exist_and_the_code_cites_them():
    """The checks above would pass vacuously if the scan saw nothing: the citations we know of must be seen."""
    for name in ("architecture.md", "formats.md", "gguf.md"):
        assert (ROOT / "docs" / name).is_file()
    cited = {name for path in scanned_files(ROOT) for name, _ in references(path)}
    assert {"docs/gguf.md", "docs/formats.md"} <= cited
    assert len(markdown_links(ROOT / "docs" / "architecture.md")) > 5


# ------------------------------------------------------------------------------------- the checker itself


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Token files\n\nSee [the README](../README.md).\n")
    (tmp_path / "README.md").write_text("Read [the guide](docs/guide.md#token-files).\n")
    (tmp_path / "tinygpt").mkdir()
    (tmp_path / "tinygpt" / "mod.py").write_text(
        '"""Follows docs/guide.md#token-files."""\n\n'
        'NAMES = ["c.md", "x.md"]  # files a test creates: not citations\n'
        'HINT = "see docs/guide.md"\n'
    )
    return tmp_path


def test_the_checker_accepts_a_consistent_repo(repo):
    assert broken_references(repo) == [] and broken_links(repo) == []


def test_the_checker_reports_a_missing_document_or_section(repo):
    mod = repo / "tinygpt" / "mod.py"
    mod.write_text(mod.read_text() + "# the rules are in DESIGN.md\n# and docs/guide.md#no-such-part\n")
    problems = broken_references(repo)
    assert len(problems) == 2
    assert "tinygpt/mod.py names DESIGN.md, which is not in the repo" in problems
    assert "no such section" in " ".join(problems)


def test_the_checker_reports_a_docs_path_in_a_message(repo):
    (repo / "tinygpt" / "mod.py").write_text('ERROR = "read docs/missing.md first"\n')
    assert broken_references(repo) == ["tinygpt/mod.py names docs/missing.md, which is not in the repo"]


def test_the_checker_reports_broken_links(repo):
    (repo / "docs" / "guide.md").write_text("# Guide\n\n[gone](gone.md), [part](#nowhere), [web](https://x.org/a.md)\n")
    problems = broken_links(repo)
    assert len(problems) == 3, problems  # the README's #token-files section is gone too
    assert any("gone.md, which does not exist" in p for p in problems)
