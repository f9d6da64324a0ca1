"""The rule's ``step_decay``: an inverse-square-root multiplier on its update after ``tau``
optimizer steps, applied alike by the drop-in optimizer and its higher twin, stored in
checkpoints and validated there."""

from __future__ import annotations

import math

import higher
import pytest
import torch
from torch import nn

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from learned_optim.metalearner import rule_fingerprint
from learned_optim.truncated import general_rule

TAU = 3
STEPS = 9


def _rule(step_decay):
    torch.manual_seed(4)
    rule = general_rule().double()
    rule.step_decay = step_decay
    return rule


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _data():
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(16, 3, generator=generator, dtype=torch.float64),
            torch.randn(16, 2, generator=generator, dtype=torch.float64))


def _train(rule, schedule=None):
    model, (x, y) = _model(), _data()
    opt = LSTMMetaOptimizer(model.parameters(), rule)
    for step in range(1, STEPS + 1):
        if schedule is not None:
            opt.param_groups[0]["lr"] = schedule(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)  # the twin always reads the loss
    return model, opt


def test_step_decay_is_the_documented_lr_schedule_exactly():
    decayed, _ = _train(_rule(TAU))
    scheduled, _ = _train(_rule(None), lambda t: min(1.0, math.sqrt(TAU / t)))
    plain, _ = _train(_rule(None))
    for a, b, c in zip(decayed.parameters(), scheduled.parameters(), plain.parameters()):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # the decay did act after TAU steps


def test_step_decay_composes_with_the_group_lr():
    decayed, _ = _train(_rule(TAU), lambda t: 0.5)
    scheduled, _ = _train(_rule(None), lambda t: 0.5 * min(1.0, math.sqrt(TAU / t)))
    for a, b in zip(decayed.parameters(), scheduled.parameters()):
        assert torch.equal(a, b)


def test_higher_twin_applies_the_same_decay():
    rule = _rule(TAU)
    model, opt = _train(rule)
    twin_model, (x, y) = _model(), _data()
    twin_opt = LSTMMetaOptimizer(twin_model.parameters(), rule)
    with higher.innerloop_ctx(twin_model, twin_opt) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        for ours, theirs in zip(model.parameters(), fmodel.parameters()):
            assert torch.allclose(ours, theirs, atol=1e-12)
    assert opt.state[model[0].weight]["rule_step"] == STEPS


def test_a_rule_without_decay_keeps_its_hyperparameters_and_fingerprint():
    rule = _rule(None)
    assert "step_decay" not in rule.hyperparameters()
    fingerprint = rule_fingerprint(rule)
    rule.step_decay = 100.0
    assert rule.hyperparameters()["step_decay"] == 100.0
    assert rule_fingerprint(rule) != fingerprint


def test_step_decay_round_trips_and_bad_values_are_refused(tmp_path):
    rule = general_rule(gradient_scale=0.1)
    rule.step_decay = 150.0
    path = save_checkpoint(tmp_path / "rule.safetensors", rule)
    loaded = load_checkpoint(path).meta_learner
    assert loaded.step_decay == 150.0 and loaded.update_multiplier(600) == 0.5
    with pytest.raises(ValueError, match="step_decay"):
        MetaLearnerLSTM(step_decay=0)
    with pytest.raises(ValueError, match="step_decay"):
        MetaLearnerLSTM(step_decay=float("nan"))
    from learned_optim.checkpoint import validate_record
    spec = {"class": "MetaLearnerLSTM", "hidden_size": 20, "p": 10.0, "step_decay": -5}
    with pytest.raises(CheckpointError, match="meta_learner.step_decay"):
        validate_record("x.safetensors", {"method": "lstm", "meta_learner": spec})


def test_the_shipped_general_rule_carries_the_decay_its_evidence_selects():
    from pathlib import Path

    from learned_optim.checkpoint import PRETRAINED_DIR
    from learned_optim.packaging.general_rule import choose_step_decay

    root = Path(__file__).resolve().parents[1]
    evidence = sorted((root / "docs" / "results" / "step_size").glob("decay_from_*.json"))
    chosen = choose_step_decay(evidence)
    shipped = load_checkpoint(PRETRAINED_DIR / "general.safetensors")
    assert shipped.meta_learner.step_decay == chosen["tau"] == 100.0
    card = shipped.record["card"]["step_decay"]
    assert card["tau"] == 100.0 and card["problems"] == 24 and card["horizon"] == 2000
    # the undecayed rule is one of the compared settings, and it lost on accuracy
    assert chosen["mean_accuracy"]["isqrt:100"] > chosen["mean_accuracy"]["1.0"]
    assert LSTMMetaOptimizer(nn.Linear(2, 1).parameters()).meta_learner.step_decay == 100.0


def test_choose_step_decay_refuses_mixed_or_incomplete_evidence(tmp_path):
    import json

    from learned_optim.packaging.general_rule import choose_step_decay

    def write(name, setting, accuracy):
        path = tmp_path / name
        path.write_text(json.dumps({"setting": {"horizon": 2000, "split": "val",
                                                "problems": ["p"], **setting},
                                    "accuracy": accuracy}))
        return path

    good = write("a.json", {}, {"1.0": [60.0], "isqrt:100": [59.0]})
    assert choose_step_decay([good])["tau"] is None  # no decay beats the undecayed rule
    with pytest.raises(ValueError, match="validation stream"):
        choose_step_decay([write("b.json", {"split": "test"}, {"1.0": [1.0]})])
    with pytest.raises(ValueError, match="settings"):
        choose_step_decay([good, write("c.json", {}, {"1.0": [1.0]})])
    with pytest.raises(ValueError, match="undecayed"):
        choose_step_decay([write("d.json", {}, {"isqrt:100": [1.0]})])
