"""The documentation contract: every public callable documents itself with a runnable example,
appears in the API reference, and the site builds in strict mode.

The examples themselves run as doctests (``--doctest-modules`` on ``src/deqkit``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MODULES = ("deqkit", "deqkit.nn", "deqkit.zoo", "deqkit.data")

# Public callables whose docstring has no example yet (each listed name is an expected
# failure below, strict: adding the example makes the test fail until the name is removed).
MISSING_EXAMPLES: set[str] = set()


def public_names(module_name: str) -> list[str]:
    """``__all__`` when the module defines it, else its non-underscore, non-module names."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n for n in vars(module) if not n.startswith("_")
            and not inspect.ismodule(getattr(module, n))
            and n not in {"annotations"}
        ]
    return sorted(names)


PUBLIC = [f"{m}.{n}" for m in MODULES for n in public_names(m)]
CALLABLES = [
    p for p in PUBLIC
    if callable(getattr(importlib.import_module(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1]))
]


def _obj(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_public_surface_is_found():
    assert "deqkit.fixed_point" in CALLABLES and "deqkit.nn.DEQ" in CALLABLES
    assert len(CALLABLES) > 60
    assert set(CALLABLES) >= MISSING_EXAMPLES


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="example still missing"))
        if p in MISSING_EXAMPLES else p
        for p in CALLABLES
    ],
)
def test_public_callable_has_docstring_with_example(path):
    doc = inspect.getdoc(_obj(path)) or ""
    assert len(doc.splitlines()) >= 2, f"{path}: no docstring beyond a summary line"
    assert ">>>" in doc, f"{path}: the docstring has no example (a >>> doctest)"


def test_every_public_name_is_in_the_api_reference():
    pages = "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    missing = [p for p in PUBLIC if f"::: {p}\n" not in pages]
    assert not missing, f"add these to a page under docs/api/: {missing}"


def _extension():
    pytest.importorskip("griffe")
    path = DOCS / "_ext" / "rst_to_markdown.py"
    spec = importlib.util.spec_from_file_location("rst_to_markdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rst_docstrings_become_markdown():
    convert = _extension().convert
    text = (
        "Solve :math:`z = f(z)` with :class:`~deqkit.Anderson` or :func:`deqkit.fixed_point`.\n"
        "\n"
        ".. math::\n"
        "    a = b\n"
        "    + c\n"
        "\n"
        "Args:\n"
        "    x: value. Default: 1.\n"
        "\n"
        ".. math:: u = v\n"
        "\n"
        "Some text\n"
        ">>> 1 + 1\n"
        "2\n"
        "\n"
        "Example (a caption):\n"
        "\n"
        "    >>> 2 + 2\n"
        "    4\n"
    )
    out = convert(text)
    assert out.startswith("Solve $z = f(z)$ with `Anderson` or `deqkit.fixed_point`.")
    assert "$$\na = b\n+ c\n$$" in out
    assert "$$\nu = v\n$$" in out
    assert "```pycon\n>>> 1 + 1\n2\n```" in out  # a bare doctest is fenced
    assert "Examples:\n    A caption:\n\n    >>> 2 + 2\n    4" in out  # a section is kept
    assert ".. math" not in out and ":class:" not in out


@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs not installed (pip install -e '.[docs]')")
def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (tmp_path / "site" / "api" / "fixed-point" / "index.html").read_text()
    assert 'id="deqkit.fixed_point"' in html and "arithmatex" in html


GUIDES_WITH_CODE = ["index.md", "guides/getting-started.md", "guides/debugging.md",
                    "guides/design.md"]


@pytest.mark.parametrize("page", GUIDES_WITH_CODE)
def test_guide_code_runs(page, capsys, monkeypatch):
    """The ```python blocks of a guide run in order, in one namespace, without warnings."""
    text = (DOCS / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    assert blocks, f"{page} has no python code block"
    module = types.ModuleType("deqkit_guide")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, page, "exec", dont_inherit=True), module.__dict__)
    capsys.readouterr()
