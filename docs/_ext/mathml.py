"""MkDocs hook: render the site's formulas to MathML at build time, so they show offline.

``pymdownx.arithmatex`` (generic mode) wraps every formula of a page, docstrings rendered by
mkdocstrings included, as ``<span class="arithmatex">\\(...\\)</span>`` (inline) or
``<div class="arithmatex">\\[...\\]</div>`` (display). This hook replaces the TeX inside each
wrapper by MathML from `latex2mathml <https://pypi.org/project/latex2mathml/>`_ (pure Python,
the ``docs`` extra), which browsers render natively: the built site loads no script, style
sheet or font for its maths. The TeX source is kept as the formula's
``<annotation encoding="application/x-tex">``.

Before conversion a few constructs that latex2mathml renders wrongly are rewritten
(:data:`_REWRITES`); after it, a formula whose MathML still shows a TeX command or a bare
``&`` is reported as a warning, which fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

_FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*'
    r"(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<display>.*?)\\\])\s*</(?P=tag)>",
    re.DOTALL,
)

# (pattern, replacement) applied in order to the TeX before conversion.
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    # latex2mathml knows ``align*`` but reads ``aligned``'s ``&`` as a letter.
    (re.compile(r"\\(begin|end)\{aligned\}"), r"\\\1{align*}"),
    # Sized delimiters: latex2mathml keeps ``\big\|`` and ``\Big\vert`` as literal text.
    (re.compile(r"(\\[bB]igg?[lrm]?)\s*(?:\\\||\\[lr]?Vert(?![A-Za-z]))"), "\\1\u2016"),
    (re.compile(r"(\\[bB]igg?[lrm]?)\s*\\[lr]?vert(?![A-Za-z])"), r"\1|"),
    # Operator names it does not know.
    (re.compile(r"\\(arg)(?![A-Za-z])"), r"\\operatorname{\1}"),
    # Negative thin space: its MathML width ("negativethinmathspace") is not valid CSS.
    (re.compile(r"\\!"), ""),
]

# A TeX command left as text in the output means latex2mathml did not understand it.
_LEFTOVER = re.compile(r">[^<]*(\\[A-Za-z]+|&(?![#\w]+;))[^<]*<")


def to_mathml(tex: str, display: bool) -> str:
    """TeX (without delimiters) to a ``<math>`` element with the TeX as its annotation.

    Raises ``ValueError`` when the formula cannot be converted faithfully.
    """
    source = tex.strip()
    fixed = source
    for pattern, replacement in _REWRITES:
        fixed = pattern.sub(replacement, fixed)
    try:
        mathml = convert(fixed, display="block" if display else "inline")
    except Exception as exc:  # latex2mathml raises its own exception types
        raise ValueError(f"latex2mathml cannot convert {source!r}: {exc}") from exc
    leftover = _LEFTOVER.search(mathml)
    if leftover:
        raise ValueError(
            f"latex2mathml left {leftover.group(1)!r} unconverted in {source!r}: rewrite the "
            "formula or add a rule to _REWRITES in docs/_ext/mathml.py"
        )
    head, sep, body = mathml.partition(">")
    inner = body.removesuffix("</math>")
    annotation = f'<annotation encoding="application/x-tex">{html.escape(source)}</annotation>'
    return f"{head}{sep}<semantics>{inner}{annotation}</semantics></math>"


def render(page_html: str, where: str = "") -> str:
    """Replace every arithmatex formula in ``page_html`` by MathML (wrapper kept)."""

    def replace(match: re.Match[str]) -> str:
        display = match.group("display") is not None
        tex = html.unescape(match.group("display" if display else "inline"))
        try:
            mathml = to_mathml(tex, display)
        except ValueError as exc:
            log.warning("%s: %s", where, exc)
            return match.group(0)
        tag = match.group("tag")
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return _FORMULA.sub(replace, page_html)


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    return render(html_text, page.file.src_uri)
