"""Sphinx configuration of the sam-optax documentation (MyST markdown, furo theme)."""

import os
import sys

# The API reference imports the library from this checkout.
sys.path.insert(0, os.path.abspath(".."))

project = "sam-optax"
author = "sam-optax developers"
copyright = "sam-optax developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax from the sphinx-mathjax-offline package, copied into _static/mathjax: the built
    # pages render their formulas with no network (sphinx.ext.mathjax alone loads a CDN).
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "sam-optax"


# The docstrings write absolute values and norms as plain text (|w|, ||g||_2), as read by help()
# in a terminal; reStructuredText would take |w| for a substitution. Escape every bar outside
# math, literal and doctest blocks and outside ``literals``.
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape_bars(text: str) -> str:
    parts = text.split("``")
    for i in range(0, len(parts), 2):  # the even parts lie outside ``literals``
        parts[i] = parts[i].replace("|", "\\|")
    return "``".join(parts)


def _escape_docstring_bars(app, what, name, obj, options, lines):
    verbatim_indent = None  # the indentation of the directive or `::` line opening a block
    in_doctest = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if verbatim_indent is not None:
            if not stripped or _indent(line) > verbatim_indent:
                continue
            verbatim_indent = None
        if in_doctest:
            if stripped:
                continue
            in_doctest = False
        if stripped.startswith(">>>"):
            in_doctest = True
            continue
        if stripped.startswith(".. math::") or stripped.startswith(".. code"):
            verbatim_indent = _indent(line)
            if stripped.startswith(".. math::"):
                continue  # an inline formula after `.. math::` stays as it is
        if ":math:`" not in line:
            lines[i] = _escape_bars(line)
        if stripped.endswith("::"):
            verbatim_indent = _indent(line)


def setup(app):
    app.connect("autodoc-process-docstring", _escape_docstring_bars)
