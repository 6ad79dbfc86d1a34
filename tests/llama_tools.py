"""Find llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity, llama-server, ...).

They are built by tools/build_llama_tools.sh, which CI runs. A test that needs one calls `llama_tool(name)`: it
skips on a developer machine without the build, and fails under CI (CI=true), where a missing tool means the
install step broke rather than that the check is optional.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SEARCH_DIRS = (Path("/opt/llama.cpp/bin"), Path.home() / ".cache" / "tinygpt" / "llama.cpp" / "bin")


def find_llama_tool(name: str) -> Path | None:
    """The tool's path: $LLAMA_CPP_BIN first, then PATH, then the build script's usual prefixes."""
    if os.environ.get("LLAMA_CPP_BIN"):
        candidate = Path(os.environ["LLAMA_CPP_BIN"]) / name
        if candidate.is_file():
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    for folder in SEARCH_DIRS:
        if (folder / name).is_file():
            return folder / name
    return None


def llama_tool(name: str) -> Path:
    path = find_llama_tool(name)
    if path is None:
        message = f"{name} not found: run tools/build_llama_tools.sh and set LLAMA_CPP_BIN"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
