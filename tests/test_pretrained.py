"""Shipped checkpoints: every name loads, and each one still reaches its model card's score."""

import math
from pathlib import Path

import pytest
import torch

from learned_optim import LSTMMetaOptimizer, available_pretrained, load_checkpoint
from learned_optim.evaluate import evaluate

SHIPPED = ["general", "omniglot-20w1s", "omniglot-20w5s", "omniglot-5w1s", "omniglot-5w5s",
           "omniglot-lake-20w1s", "omniglot-lake-5w1s", "omniglot-lake-alphabets-20w1s",
           "omniglot-lake-alphabets-resnet12-20w1s", "sinusoid-10shot", "sinusoid-10shot-maml"]
# The episodic checkpoints, whose cards evaluate() reproduces (general's come from benchmarks).
EPISODIC = [name for name in SHIPPED if name != "general"]
# Few episodes keep CI fast; the tolerance below is sized for this count.
CHECK_EPISODES = {"omniglot-5w1s": 40, "omniglot-5w5s": 30, "omniglot-20w1s": 15,
                  "omniglot-20w5s": 10, "omniglot-lake-5w1s": 40, "omniglot-lake-20w1s": 15,
                  "omniglot-lake-alphabets-20w1s": 15, "omniglot-lake-alphabets-resnet12-20w1s": 15,
                  "sinusoid-10shot": 100, "sinusoid-10shot-maml": 100}


def test_every_checkpoint_is_shipped():
    assert available_pretrained() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_from_pretrained_loads_the_rule(name):
    model = torch.nn.Linear(3, 2)
    opt = LSTMMetaOptimizer.from_pretrained(name, model.parameters())
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()
    opt.step(loss=loss)
    card = load_checkpoint(name).record["card"]
    assert card["episodes_trained"] > 0 and card["test"]["results"]


@pytest.mark.parametrize("name", EPISODIC)
def test_checkpoint_reaches_its_model_card_score(name, shared_data):
    torch.set_num_threads(1)
    record = load_checkpoint(name).record
    ours = next(iter(record["card"]["test"]["results"].values()))
    episodes = CHECK_EPISODES[name]
    report = evaluate(name, episodes=episodes,
                      data_root=str(shared_data / "omniglot") if "omniglot" in name else None)
    measured = next(iter(report.results.values()))
    # The card's CI gives the per-episode spread; allow 3 standard errors at this count.
    spread = ours["ci95"] * math.sqrt(ours["episodes"]) / 1.96
    tolerance = 3 * spread / math.sqrt(episodes) + 1e-3
    assert abs(measured.mean - ours["mean"]) <= tolerance, (measured, ours)


def _readme_rows() -> dict[str, list[str]]:
    """The cells of the README's "Shipped checkpoints" table, by checkpoint name."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Shipped checkpoints", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def _shown(row: dict, metric: str) -> str:
    if metric == "accuracy":
        return f"{row['mean'] * 100:.2f} +- {row['ci95'] * 100:.2f}%"
    return f"MSE {row['mean']:.2f} +- {row['ci95']:.2f}"


@pytest.mark.parametrize("name", SHIPPED)
def test_readme_table_quotes_the_model_card(name):
    test = load_checkpoint(name).record["card"]["test"]
    results = test["results"]
    cells = _readme_rows()[name]
    ours = next(iter(results.values()))
    assert cells[2:4] == [_shown(ours, test["metric"]), _shown(results["sgd"], test["metric"])]


def test_each_sinusoid_rule_is_best_on_its_own_family():
    """--protocol: each shipped sinusoid rule evaluated on the other family (Meta-SGD's has a
    frequency and phases of the other sign), on the same 100 tasks."""
    names = ("sinusoid-10shot", "sinusoid-10shot-maml")
    mse = {(name, family): evaluate(name, protocol=family, episodes=100)
           .results["meta-learner LSTM"].mean
           for name in names for family in ("maml", "metasgd")}
    assert [load_checkpoint(name).record["config"]["protocol"] for name in names] == [
        "metasgd", "maml"]
    # Measured on 600 test tasks: 0.28 against 0.73 (metasgd rule), 0.13 against 1.33 (maml).
    assert mse["sinusoid-10shot", "metasgd"] * 2 < mse["sinusoid-10shot", "maml"]
    assert mse["sinusoid-10shot-maml", "maml"] * 4 < mse["sinusoid-10shot-maml", "metasgd"]
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate("sinusoid-10shot", protocol="nope", episodes=2)
