"""benchmarks/transfer.py: reused baselines are only combined with a rule scored on the same
test episodes."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import transfer  # noqa: E402


def test_reused_baselines_of_another_episode_count_are_refused():
    stored = {"lr": {"sgd": 0.1, "adam": 0.003}, "lr_grid": {},
              "results": {"SGD": {"episodes": 100}, "Adam": {"episodes": 100},
                          "untrained MetaLearnerLSTM": {"episodes": 100},
                          "learned rule": {"episodes": 100}}}
    args = Namespace(ways=5, steps=5, queries=15, tune_episodes=20, episodes=200, filters=32)
    with pytest.raises(SystemExit, match=r"ran on 100 test episodes, not --episodes 200; "
                                         r"rerun with --episodes 100"):
        transfer.run_cell(args, None, None, None, "mlp", 1, stored)
