"""Plots: run curves from metrics.jsonl, the gates of the rule, and `learned-optim plot`."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.cli import main as cli_main
from learned_optim.config import MetaTrainConfig
from learned_optim.learners import SinusoidMLP
from learned_optim.plots import gate_values, plot_gates, plot_run, pyplot, record_gates
from learned_optim.train import meta_train

pytest.importorskip("matplotlib")


def assert_png(path, min_width=400):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= 200


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) meta-training run folder."""
    folder = tmp_path_factory.mktemp("run") / "sinusoid"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: faster, and no stalls on a busy machine
    try:
        meta_train(MetaTrainConfig(meta_steps=3, meta_batch=1, val_episodes=2, validate_every=2,
                                   run_dir=str(folder)), progress=False)
    finally:
        torch.set_num_threads(threads)
    return folder


def stepped_optimizer(steps=1):
    torch.manual_seed(0)
    model = SinusoidMLP(hidden=8)
    opt = LSTMMetaOptimizer(model.parameters(), MetaLearnerLSTM())
    x = torch.linspace(-3, 3, 10)[:, None]
    y = torch.sin(x)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    return model, opt, (x, y)


def test_plot_run_writes_curves_png_beside_the_log(run_dir):
    path = plot_run(run_dir)
    assert path == run_dir / "curves.png"
    assert_png(path)


def test_plot_run_writes_where_asked(run_dir, tmp_path):
    path = plot_run(run_dir, tmp_path / "figures" / "run.png")
    assert path == tmp_path / "figures" / "run.png"
    assert_png(path)


def test_plot_run_refuses_a_folder_without_a_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)


def test_plot_run_refuses_an_empty_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plot_run(tmp_path)


def test_plot_run_draws_a_classification_log_with_validation_only(tmp_path):
    entries = [{"step": 0, "val_accuracy": 0.2, "val_accuracy_ci95": 0.01, "val_episodes": 9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert_png(plot_run(tmp_path))


def test_cli_plot_writes_the_png_and_names_it(run_dir, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert cli_main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)


def test_cli_plot_reports_a_missing_run_as_an_error(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_gate_values_are_the_sigmoids_of_the_last_two_state_columns():
    model, opt, _ = stepped_optimizer()
    gates = gate_values(opt, {p: n for n, p in model.named_parameters()})
    assert list(gates) == [n for n, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        state = opt.state[param]["lstm_state"]
        forget, input_ = gates[name]
        assert forget.shape == param.shape
        torch.testing.assert_close(forget.flatten(), torch.sigmoid(state[:, -2]))
        torch.testing.assert_close(input_.flatten(), torch.sigmoid(state[:, -1]))


def test_gates_are_the_factors_of_the_update():
    # theta_t = f_t * theta_{t-1} - i_t * grad_t, with the gates that gate_values reports.
    model, opt, (x, y) = stepped_optimizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step(loss=loss)
    gates = gate_values(opt, {p: n for n, p in model.named_parameters()})
    for name, param in model.named_parameters():
        forget, input_ = gates[name]
        torch.testing.assert_close(param.detach(), forget * before[name] - input_ * grads[name],
                                   rtol=1e-5, atol=1e-6)


def test_a_fresh_meta_learner_gates_are_near_its_initial_biases():
    _, opt, _ = stepped_optimizer()
    f0, i0 = torch.sigmoid(opt.meta_learner.meta_bias.detach())
    for forget, input_ in gate_values(opt).values():
        assert torch.allclose(forget, f0.expand_as(forget), atol=0.01)
        assert torch.allclose(input_, i0.expand_as(input_), atol=0.01)


def test_record_gates_gives_one_json_record_per_tensor_and_step():
    model, opt, _ = stepped_optimizer()
    records = record_gates(opt, step=3, episode=2, model=model)
    assert [r["layer"] for r in records] == [n for n, _ in model.named_parameters()]
    assert {r["step"] for r in records} == {3} and {r["episode"] for r in records} == {2}
    assert set(records[0]) == {"episode", "step", "layer", "forget_mean", "forget_std",
                               "input_mean", "input_std"}
    assert json.loads(json.dumps(records)) == records
    assert 0.9 < records[0]["forget_mean"] < 1 and 0 < records[0]["input_mean"] < 0.05


def test_record_gates_names_tensors_by_position_without_a_model():
    _, opt, _ = stepped_optimizer()
    assert [r["layer"] for r in record_gates(opt, step=1)][:2] == ["param0", "param1"]


def test_plot_gates_writes_a_png_over_steps_and_episodes(tmp_path):
    records = []
    for episode in range(2):
        model, opt, (x, y) = stepped_optimizer()
        for step in range(1, 4):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss)
            records += record_gates(opt, step=step, episode=episode, model=model)
    path = plot_gates(records, tmp_path / "gates.png")
    assert_png(path)


def test_plot_gates_refuses_no_records(tmp_path):
    with pytest.raises(ValueError, match="no gate records"):
        plot_gates([], tmp_path / "gates.png")


def test_missing_matplotlib_is_reported_with_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"learned_optim\[plot\]"):
        pyplot()
