"""Evaluation output a reviewer can re-check: per-episode scores, seed, versions, and each
baseline's paired difference to the meta-learner LSTM on the same episodes."""

import json
import platform
import sys

import pytest
import torch

import learned_optim
from learned_optim import cli
from learned_optim.evaluate import evaluate
from learned_optim.stats import summarize


@pytest.fixture(scope="module")
def report():
    return evaluate("sinusoid-10shot", episodes=12, baselines=["sgd", "nn"], tune_episodes=3)


def test_report_keeps_per_episode_scores_in_episode_order(report):
    for name in ("meta-learner LSTM", "sgd", "nn"):
        scores = report.scores[name]
        assert len(scores) == 12
        assert summarize(scores) == report.results[name]
    again = evaluate("sinusoid-10shot", episodes=12)
    assert again.scores["meta-learner LSTM"] == report.scores["meta-learner LSTM"]


def test_paired_difference_is_the_mean_of_per_episode_differences(report):
    ours, sgd = report.scores["meta-learner LSTM"], report.scores["sgd"]
    paired = report.paired_differences()["sgd"]
    differences = [b - a for a, b in zip(ours, sgd)]
    assert paired.mean == pytest.approx(sum(differences) / 12, abs=1e-12)
    assert paired == summarize(differences)
    # Pairing removes the variation between episodes: the interval is narrower than the
    # unpaired one (measured on these 12 tasks).
    unpaired = (report.results["sgd"].ci95 ** 2 + report.results["meta-learner LSTM"].ci95 ** 2)
    assert paired.ci95 < unpaired ** 0.5


def test_json_holds_scores_seed_versions_and_paired_differences(report, tmp_path):
    path = tmp_path / "results.json"
    report.write_json(path)
    saved = json.loads(path.read_text())
    assert saved["seed"] == 0 and saved["results"]["sgd"]["episodes"] == 12
    assert saved["versions"] == {"learned_optim": learned_optim.__version__,
                                 "torch": torch.__version__,
                                 "higher": saved["versions"]["higher"],
                                 "python": platform.python_version()}
    assert saved["reference"] == "meta-learner LSTM"
    sgd = saved["results"]["sgd"]
    assert sgd["scores"] == report.scores["sgd"]
    assert sgd["paired_difference"]["minus"] == "meta-learner LSTM"
    assert sgd["paired_difference"]["mean"] == report.paired_differences()["sgd"].mean
    assert "paired_difference" not in saved["results"]["meta-learner LSTM"]


def test_markdown_table_shows_the_paired_difference(report):
    table = report.to_markdown()
    assert "minus meta-learner LSTM (paired, 95% CI)" in table.splitlines()[0]
    paired = report.paired_differences()["sgd"]
    assert f"| {paired.mean:+.2f} +- {paired.ci95:.2f} |" in table


def test_cli_evaluate_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["learned-optim"])
    out = tmp_path / "r.json"
    assert cli.main(["evaluate", "sinusoid-10shot", "--episodes", "4", "--baselines", "sgd",
                     "--tune-episodes", "2", "--no-progress", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert len(saved["results"]["sgd"]["scores"]) == 4
    assert "paired_difference" in saved["results"]["sgd"]
    assert "minus meta-learner LSTM" in capsys.readouterr().out


def test_config_fields_of_a_newer_writer_are_ignored_and_bad_ones_named(tmp_path):
    from learned_optim.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    shipped = load_checkpoint("sinusoid-10shot")
    newer = dict(shipped.record["config"], preprocessing={"scale": 2.0})
    path = save_checkpoint(tmp_path / "newer.safetensors", shipped.meta_learner,
                           learned_init=shipped.learned_init, config=newer)
    assert evaluate(path, episodes=3).scores["meta-learner LSTM"] == evaluate(
        "sinusoid-10shot", episodes=3).scores["meta-learner LSTM"]
    broken = save_checkpoint(tmp_path / "broken.safetensors", shipped.meta_learner,
                             config=dict(newer, shots="ten"))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: field 'config'"):
        evaluate(broken, episodes=3)


def test_learning_rate_tuning_keeps_the_best_and_every_score():
    from learned_optim.evaluate import LR_GRIDS, tune_learning_rate

    def distance_to(target):
        return lambda factory: abs(factory.keywords["lr"] - target)

    best, grid = tune_learning_rate("adam", distance_to(3e-3), higher_is_better=False)
    assert best == 3e-3 and list(grid) == list(LR_GRIDS["adam"])
    best, _ = tune_learning_rate("sgd", lambda factory: 1.0)  # ties keep the earlier rate
    assert best == LR_GRIDS["sgd"][0]


def test_another_number_of_ways_starts_every_class_alike(shared_data):
    """The 20-way lake-alphabets checkpoint at 5 ways: the head's rows start as the mean of
    the learned ones (a random head scored 62% on validation episodes, this 97%)."""
    torch.set_num_threads(1)
    report = evaluate("omniglot-lake-alphabets-20w1s", ways=5, episodes=8,
                      data_root=str(shared_data / "omniglot"))
    row = report.as_dict()["results"]["meta-learner LSTM"]
    assert row["init"] == ("learned init except ['head.bias', 'head.weight'] (every class as "
                           "the mean of the learned rows)")
    assert row["mean"] >= 0.9, row["mean"]
