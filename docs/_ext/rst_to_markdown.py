"""Griffe extension: render deqkit's reStructuredText-flavoured docstrings as Markdown.

The docstrings are written for ``help()`` and doctest first: Google-style sections with a few
reST constructs (``.. math::`` blocks, ``:math:`` and ``:class:`` roles). mkdocstrings renders
Markdown, so before a docstring is parsed this extension rewrites

* ``.. math::`` directives as ``$$ ... $$`` blocks and ``:math:`x``` roles as ``$x$``
  (rendered by ``pymdownx.arithmatex`` and, at build time, MathML: ``mathml.py``); a
  multi-line ``.. math::`` block (one with ``\\\\`` breaks) becomes an ``aligned`` environment,
  as in Sphinx;
* cross-reference roles (``:class:`~deqkit.Solution```, ``:func:`fixed_point```) as code spans;
* ``Example:`` and ``Example (caption):`` headings as Google ``Examples:`` sections, and
  doctest runs outside such a section as fenced ``pycon`` blocks (Markdown would otherwise
  read ``>>>`` as nested block quotes).

The source files are not changed; ``help()`` and doctest see the original text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const|ref):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_EXAMPLE = re.compile(r"^(\s*)Examples?(?:\s*\((.*)\))?:\s*$")
_SECTION = re.compile(r"^(\s*)[A-Z][A-Za-z ]*:\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        pad, first = m.group(1), m.group(2)
        body = [first] if first else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        trailing = body[1:] if first else body
        cut = min((_indent(b) for b in trailing if b.strip()), default=0)
        content = [first] if first else []
        content += [b[cut:] if b.strip() else "" for b in trailing]
        content = [c for c in content if c.strip()]
        joined = "\n".join(content)
        if "\\\\" in joined and "\\begin" not in joined:
            # Like Sphinx's math directive: a multi-line equation (``\\`` breaks, ``&``
            # alignment points) is an aligned environment, not a bare formula.
            content = ["\\begin{aligned}", *content, "\\end{aligned}"]
        if out and out[-1].strip():
            out.append("")
        out += [pad + "$$", *(pad + c for c in content), pad + "$$", ""]
    return out


def _examples(lines: list[str]) -> list[str]:
    out: list[str] = []
    section: int | None = None  # indentation of the current Examples: heading
    i = 0
    while i < len(lines):
        line = lines[i]
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        m = _EXAMPLE.match(line)
        if m and section is None:
            section = len(m.group(1))
            out.append(m.group(1) + "Examples:")
            if m.group(2):
                out.append(m.group(1) + "    " + m.group(2)[0].upper() + m.group(2)[1:] + ":")
                if i + 1 < len(lines) and lines[i + 1].strip():
                    out.append("")
            i += 1
            continue
        if section is None and line.lstrip().startswith(">>>"):
            prev = next((o for o in reversed(out) if o.strip()), "")
            pad = min(_indent(line), _indent(prev)) if prev else _indent(line)
            cut = _indent(line)
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][cut:] if _indent(lines[i]) >= cut else lines[i].lstrip())
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += [" " * pad + "```pycon", *(" " * pad + b for b in block), " " * pad + "```"]
            continue
        out.append(line)
        i += 1
    return out


def convert(text: str) -> str:
    """Rewrite one docstring (see the module docstring)."""
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", text)
    text = _ROLE.sub(_role, text)
    lines = _math_blocks(text.splitlines())
    return "\n".join(_examples(lines))


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded objects before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
