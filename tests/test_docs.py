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


def _mathml_hook():
    pytest.importorskip("latex2mathml")
    path = DOCS / "_ext" / "mathml.py"
    spec = importlib.util.spec_from_file_location("mathml_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_formulas_become_mathml():
    hook = _mathml_hook()
    page = (
        '<p>Find <span class="arithmatex">\\(z^\\star = f(z^\\star)\\)</span>.</p>\n'
        '<div class="arithmatex">\\[\n\\begin{aligned} a &amp;= \\arg\\min_z \\Big\\|z\\Big\\|'
        " \\\\ b &amp;= \\min\\!\\left(1, \\tfrac12\\right) \\end{aligned}\n\\]</div>"
    )
    out = hook.render(page)
    assert out.count("<math ") == 2 and 'display="block"' in out and 'display="inline"' in out
    assert '<span class="arithmatex"><math' in out and '<div class="arithmatex"><math' in out
    assert '<annotation encoding="application/x-tex">z^\\star = f(z^\\star)</annotation>' in out
    assert "<mtable" in out and "<mi>&amp;</mi>" not in out and "<mi>&</mi>" not in out
    assert "\\arg" not in out.split("<annotation")[0]  # rewritten before conversion
    with pytest.raises(ValueError, match="unconverted"):
        hook.to_mathml("\\notacommand x", display=False)


@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs not installed (pip install -e '.[docs]')")
def test_docs_site_works_offline(tmp_path):
    """The built site loads no script or style sheet from the network, and its formulas are
    MathML that the browser draws without a renderer (docs/_ext/mathml.py)."""
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("latex2mathml")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    remote = re.compile(
        r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//[^\"']*", re.I)
    imports = re.compile(r"@import\s+(?:url\()?[\"']?(?:https?:)?//", re.I)
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    for page in pages:
        text = page.read_text(encoding="utf-8")
        where = page.relative_to(site)
        assert not remote.findall(text), f"{where} loads {remote.findall(text)}"
        assert not re.search(r'class="arithmatex">\s*\\[(\[]', text), f"{where}: raw TeX left"
        for css in re.findall(r'<link[^>]*rel="stylesheet"[^>]*href="([^"]+)"', text):
            local = css.split("?")[0]
            base = site if local.startswith("/") else page.parent  # 404.html: from the root
            assert (base / local.lstrip("/")).is_file(), f"{where}: missing {css}"
    for css in site.rglob("*.css"):
        assert not imports.search(css.read_text(encoding="utf-8")), f"{css} imports remote CSS"
    # Known formulas: the implicit-function-theorem gradient in dk.fixed_point's docstring
    # (API reference) and the fixed-point equation of the tutorials' linear DEQ.
    api = (site / "api" / "fixed-point" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'<div class="arithmatex"><math [^>]*display="block"', api)
    assert "\\frac{\\partial \\ell}{\\partial \\theta}" in api  # as the annotation
    assert "<mfrac>" in api and "<msup><mi>z</mi><mo>&#x022C6;</mo></msup>" in api
    tutorial = (site / "tutorials" / "linear-deq" / "index.html").read_text(encoding="utf-8")
    assert tutorial.count("<math ") > 10
    assert "mathjax" not in (api + tutorial).lower()


def test_rst_multiline_math_becomes_aligned():
    """As in Sphinx, a ``.. math::`` block with ``\\\\`` line breaks is an aligned equation."""
    convert = _extension().convert
    out = convert("Text.\n\n.. math::\n\n    a &= b, \\\\\n    c &= d.\n\nMore.\n")
    assert "$$\n\\begin{aligned}\na &= b, \\\\\nc &= d.\n\\end{aligned}\n$$" in out
    assert "\\begin{aligned}" not in convert(".. math:: a = b\n")
