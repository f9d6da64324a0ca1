"""Sphinx configuration of the learned_optim documentation.

Build (warnings are errors, as in CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import learned_optim  # noqa: E402

project = "learned_optim"
author = "learned_optim contributors"
copyright = "2026, learned_optim contributors"
release = version = learned_optim.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "cli_reference",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
# results/notes: templates of generated pages (benchmarks/results_page.py fills them in).
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store", "results/notes"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
# Type hints name torch / numpy types that Sphinx cannot cross-reference offline.
nitpicky = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_title = f"learned_optim {release}"
html_theme_options = {"description": "The Meta-Learner LSTM as a PyTorch optimizer",
                      "fixed_sidebar": True}

# Pages written by other people may not exist yet in a given checkout: a line that names a
# missing one (a toctree entry or a link on a line of its own) is dropped before parsing, so
# the build passes with or without them.
OPTIONAL_PAGES = ("results", "howto-distributed")
# Generated result tables (benchmarks/*.py write docs/results/*.md). The results page, when
# present, decides which of them it links; they are orphans otherwise, listed in the index's
# toctree (the `results/*` glob) only while there is no results page.
RESULTS_GLOB = "results/*"


def _drop_missing_pages(app, docname, source) -> None:
    missing = [name for name in OPTIONAL_PAGES if not (HERE / f"{name}.md").is_file()]
    lines = source[0].splitlines()
    if (HERE / "results.md").is_file() or not list((HERE / "results").glob("*.md")):
        lines = [line for line in lines if line.strip() != RESULTS_GLOB]
    if docname.startswith("results/") and not source[0].startswith("---"):
        lines = ["---", "orphan: true", "---", *lines]
    if missing:
        names = "(?:" + "|".join(map(re.escape, missing)) + ")"
        # a toctree entry, a Markdown link "(name.md)" or a {doc}`name` role
        pattern = re.compile(r"^\s*" + names + r"\s*$|\(" + names + r"\.md(?:#[^)]*)?\)|"
                             r"\{doc\}`" + names + "`")
        lines = [line for line in lines if not pattern.search(line)]
    source[0] = "\n".join(lines) + "\n"


def setup(app):
    app.connect("source-read", _drop_missing_pages)
