"""A Sphinx directive that renders the ``learned-optim`` command line from its argparse parser.

``.. cli-reference::`` (in Markdown: a ``{cli-reference}`` fence) writes, for the program and
each sub-command, a heading, the description and the exact ``--help`` text, so the reference
can never drift from :func:`learned_optim.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import os

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def help_text(parser: argparse.ArgumentParser) -> str:
    """``parser.format_help()`` at a fixed width, so the page does not depend on the terminal."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser.format_help()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Name -> parser of every sub-command, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class CliReference(SphinxDirective):
    """Render the program's and every sub-command's ``--help``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from learned_optim.cli import build_parser

        parser = build_parser()
        result: list[nodes.Node] = []
        entries = [(parser.prog, parser)] + [
            (f"{parser.prog} {name}", sub) for name, sub in subcommands(parser).items()]
        for title, sub in entries:
            section_id = nodes.make_id(title)
            section = nodes.section(ids=[section_id])
            section += nodes.title(text=title)
            text = help_text(sub)  # holds the description too
            section += nodes.literal_block(text, text, language="text")
            result.append(section)
        return result


def setup(app):
    app.add_directive("cli-reference", CliReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
