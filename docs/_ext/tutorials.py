"""MkDocs hook: render the tutorial scripts in ``docs/tutorials/*.py`` as pages.

A page includes a script with a line ``<!-- tutorial: NAME.py -->``. The script is written in
the "percent" cell format: its module docstring and the cells that start with
``# %% [markdown]`` (whose lines are ``#`` comments) become Markdown; every other cell,
started by ``# %%``, becomes a Python code block. The tests run the same scripts
(``tests/test_tutorials.py``), so what the pages show is what CI executes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

_MARKER = re.compile(r"^<!-- tutorial: ([\w.-]+\.py) -->$", re.MULTILINE)
_TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def script_to_markdown(source: str, name: str) -> str:
    """Convert one tutorial script to Markdown (see the module docstring)."""
    module = ast.parse(source)
    lines = source.splitlines()
    parts: list[str] = []
    start = 0
    doc = ast.get_docstring(module)
    if doc is not None:
        parts.append(doc)
        start = module.body[0].end_lineno or 0
    cells: list[tuple[bool, list[str]]] = []
    for line in lines[start:]:
        if line.startswith("# %%"):
            cells.append(("[markdown]" in line, []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            cells.append((False, [line]))
    for is_markdown, body in cells:
        if is_markdown:
            text = [b[2:] if b.startswith("# ") else b.lstrip("#") for b in body]
            parts.append("\n".join(text).strip())
        else:
            code = "\n".join(body).strip("\n")
            if code.strip():
                parts.append(f"```python\n{code}\n```")
    parts.append(f"The whole script: [`{name}`]({name}).")
    return "\n\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    def include(match: re.Match[str]) -> str:
        path = _TUTORIALS / match.group(1)
        return script_to_markdown(path.read_text(encoding="utf-8"), match.group(1))

    return _MARKER.sub(include, markdown)
