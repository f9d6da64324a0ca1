"""Every script in examples/ runs offline as a user would run it, and says what it should.

Each runs in a subprocess from a temporary working directory, with its documented default
settings (plus a variant where an example has one).
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from learned_optim import MetaLearnerLSTM, available_pretrained, save_checkpoint
from learned_optim.learners import ConvLearner

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NUMBER = r"(\d+\.\d+)"


def run_example(name: str, *args: str, cwd: Path, timeout: int = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}  # small models
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_every_example_has_a_test():
    tested = set(re.findall(r'run_example\(\s*"([a-z_]+\.py)"', Path(__file__).read_text()))
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested


def test_replace_sgd_trains_side_by_side_with_sgd(tmp_path):
    out = run_example("replace_sgd.py", cwd=tmp_path)
    start = float(re.search(r"MSE at start\s+" + NUMBER, out).group(1))
    sgd = float(re.search(r"SGD \(lr 0.01\), 20 steps\s+" + NUMBER, out).group(1))
    learned = float(re.search(r"LSTMMetaOptimizer \(.*\), 20 steps\s+" + NUMBER, out).group(1))
    assert sgd < start and learned < start
    assert learned < sgd  # the general rule, untuned, against SGD at 0.01


def test_replace_sgd_is_a_change_of_one_line():
    # The SGD loop and the learned-rule loop differ in the line that builds the optimizer.
    source = (EXAMPLES / "replace_sgd.py").read_text()
    functions = {node.name: ast.get_source_segment(source, node).splitlines()[1:]
                 for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    changed = [line for line in difflib.unified_diff(functions["train_with_sgd"],
                                                     functions["train_with_learned_rule"],
                                                     lineterm="", n=0)
               if line.startswith("+") and not line.startswith("+++")]
    assert len(changed) == 1 and all("# <-" in line for line in changed)


@pytest.fixture(scope="module")
def conv_checkpoint(tmp_path_factory) -> Path:
    """A rule + learned-init checkpoint for the omniglot-5w1s learner (untrained weights)."""
    torch.manual_seed(0)
    learner = ConvLearner(in_channels=1, ways=5, filters=64, image_size=28)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "conv.safetensors",
                           MetaLearnerLSTM(), learned_init=learner)


def test_finetune_custom_model_on_a_folder_of_images(tmp_path):
    out = run_example("finetune_custom_model.py", cwd=tmp_path)
    assert "classes=10, examples=200, shape=(1, 28, 28)" in out
    scores = {name: float(value) for name, value in
              re.findall(r"^  (\S.*?)\s+" + NUMBER + "% [+]-", out, flags=re.M)}
    assert {"MyNet, learned rule", "MyNet, SGD lr 0.1"} <= set(scores)
    assert all(0 <= value <= 100 for value in scores.values())
    if "omniglot-5w1s" in available_pretrained():  # picked automatically once shipped
        assert "omniglot-5w1s.safetensors" in out
        assert scores["ConvLearner, learned rule + learned init"] > 20.0  # above chance
    else:
        assert "note: no shipped 'omniglot-5w1s'" in out


def test_finetune_custom_model_with_a_learned_init_and_arrays(tmp_path, conv_checkpoint):
    # The user's own arrays: 5 classes x 8 grey 28 x 28 images, string labels.
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 28, 28, generator=generator) * 255).to(torch.uint8).numpy()
    labels = [f"class{i % 5}" for i in range(40)]
    import numpy as np

    np.savez(tmp_path / "mine.npz", images=images, labels=np.array(labels))
    out = run_example("finetune_custom_model.py", "--data", "mine.npz", "--checkpoint",
                      str(conv_checkpoint), "--episodes", "2", cwd=tmp_path)
    assert f"update rule from {conv_checkpoint}" in out
    for line in ("MyNet, learned rule", "ConvLearner, learned rule, random init",
                 "ConvLearner, learned rule + learned init"):
        assert re.search(re.escape(line) + r"\s+" + NUMBER + "%", out), line


def test_meta_train_trains_loads_and_finetunes(tmp_path):
    out = run_example("meta_train.py", "--no-progress", "--run-dir", "run", cwd=tmp_path)
    validation = [float(v) for v in re.findall(r"validation MSE " + NUMBER, out)]
    assert len(validation) == 4 and validation[-1] < validation[0]  # steps 0, 100, 200, 300
    assert (tmp_path / "run" / "best.safetensors").is_file()
    assert "record: method=lstm, dataset=sinusoid" in out
    assert re.search(r"learned rule\s*: " + NUMBER, out)
    assert "loaded as a torch.optim optimizer: LSTMMetaOptimizer over 1761 coordinates" in out
    assert (tmp_path / "run" / "curves.png").is_file()


def test_meta_train_with_higher_learns_and_saves(tmp_path):
    out = run_example("meta_train_with_higher.py", "--out", "rule.safetensors", cwd=tmp_path)
    before, after = map(float, re.search(NUMBER + r" before meta-training, " + NUMBER,
                                         out).groups())
    assert 0 < after < before
    assert "rule + learned init of 6 tensors" in out
    assert (tmp_path / "rule.safetensors").is_file()


def test_meta_train_with_higher_second_order_runs(tmp_path):
    out = run_example("meta_train_with_higher.py", "--second-order", "--meta-steps", "2",
                      "--meta-batch", "1", cwd=tmp_path)
    assert "(second order, 2 meta-steps)" in out


def test_plot_gates_writes_the_png(tmp_path):
    out = run_example("plot_gates.py", "--json", "gates.json", cwd=tmp_path)
    with Image.open(tmp_path / "gates.png") as image:
        assert image.format == "PNG" and image.width > 400
    forget = [float(v) for v in re.findall(r"f_t " + NUMBER, out)]
    assert len(forget) == 6 and all(0 < f <= 1 for f in forget)  # the MLP's six tensors
    assert (tmp_path / "gates.json").stat().st_size > 0
