"""The documentation: it builds with warnings as errors, and what it shows runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture
def one_thread():
    """Small tensors: one thread is faster and does not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def python_blocks(page: Path) -> list[str]:
    """The ```python fenced blocks of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    """The HTML site, built once per test session exactly as CI builds it."""
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e '.[docs]')")
    pytest.importorskip("myst_parser", reason="myst-parser is not installed "
                                              "(pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs-html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, f"sphinx build failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_docs_build_with_warnings_as_errors(built_site):
    for page in ("index", "quickstart", "concepts", "faq", "checkpoints", "cli", "api",
                 "howto-replace-optimizer", "howto-finetune-custom-model",
                 "howto-meta-train-your-data", "howto-gpu", "howto-resume", "howto-plots"):
        assert (built_site / f"{page}.html").is_file(), page


def test_api_page_is_generated_from_the_docstrings(built_site):
    html = (built_site / "api.html").read_text()
    for name in ("learned_optim.optimizer.LSTMMetaOptimizer", "learned_optim.train.meta_train",
                 "learned_optim.checkpoint.load_learned_init", "learned_optim.plots.plot_run"):
        assert f'id="{name}"' in html, name


def test_cli_reference_shows_every_command_and_option(built_site):
    from learned_optim.cli import build_parser

    html = (built_site / "cli.html").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and "plot" in a.choices).choices
    for name, sub in commands.items():
        assert f"usage: learned-optim {name}" in html, name
        for action in sub._actions:
            for option in action.option_strings:
                assert option in html, f"{name} {option}"


def test_concepts_page_states_the_update_rule_as_math(built_site):
    html = (built_site / "concepts.html").read_text()
    assert "f_t \\odot \\theta_{t-1}" in html
    assert "transductive" in html


def test_gate_figure_is_shipped_and_shown(built_site):
    assert (DOCS / "_static" / "gates.png").stat().st_size > 10_000
    assert "_images/gates.png" in (built_site / "index.html").read_text()


def test_every_example_is_documented():
    listed = (DOCS / "examples.md").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f"`{script.name}`" in listed, script.name


def test_quickstart_code_runs_as_written(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS / "quickstart.md")
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "quickstart"}
    for block in blocks:
        exec(compile(block, "quickstart.md", "exec"), namespace)
    assert namespace["loss"].item() < 1.0
    assert namespace["best"].name == "best.safetensors"


def documented_names() -> set[str]:
    """Every dotted ``learned_optim.x.y`` name and every ``:members:`` entry of an automodule
    directive in README.md and docs/*.md."""
    names = set()
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text()
        names.update(n.rstrip(".") for n in re.findall(r"\blearned_optim(?:\.\w+)+", text))
        for module, members in re.findall(
                r"automodule:: (learned_optim[\w.]*)\n\s+:members:((?:.*\n)(?:\s{5,}.*\n)*)", text):
            names.update(f"{module}.{m.strip()}" for m in members.replace("\n", " ").split(",")
                         if m.strip())
    return names


def resolve(dotted: str):
    """Import the longest module prefix of ``dotted``, then follow attributes."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_every_name_the_docs_reference_exists():
    names = documented_names()
    assert "learned_optim.checkpoint.read_record" in names  # docs/checkpoints.md and api.md
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"documented but missing: {missing}"
