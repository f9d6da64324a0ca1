"""The meta-learner module and its pure update function."""

import math

import pytest
import torch

from learned_optim.metalearner import (
    MetaLearnerLSTM,
    initial_state,
    meta_update,
    prepare_step,
    preprocess,
)
from learned_optim.rule import policy
from learned_optim.rule.math import update_rows_chunked
from learned_optim.rule.tape import update_rows_differentiable


def test_preprocessing_follows_andrychowicz_appendix_a():
    p = 10.0
    x = torch.tensor([2.0, -3.0, 1e-6, -2e-5, 0.0])
    features = preprocess(x, p)
    assert features[0].tolist() == pytest.approx([math.log(2.0) / p, 1.0])
    assert features[1].tolist() == pytest.approx([math.log(3.0) / p, -1.0])
    # |x| < e^-10 ~ 4.54e-5: (-1, e^p x)
    assert features[2].tolist() == pytest.approx([-1.0, 1e-6 * math.exp(p)])
    assert features[3].tolist() == pytest.approx([-1.0, -2e-5 * math.exp(p)])
    assert features[4].tolist() == [-1.0, 0.0]


def test_preprocessing_has_finite_gradient_at_zero():
    x = torch.tensor([0.0, 1e-30, 5.0], requires_grad=True)
    preprocess(x, 10.0).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_initialisation_matches_the_paper():
    torch.manual_seed(0)
    meta = MetaLearnerLSTM()
    for weight in (meta.weight_ih, meta.weight_hh, meta.bias, meta.meta_weight):
        assert weight.abs().max() <= 0.01
    assert 4.0 <= meta.meta_bias[0] <= 6.0
    assert -5.0 <= meta.meta_bias[1] <= -4.0
    assert meta.state_width == 42


def test_hyperparameters_are_validated():
    with pytest.raises(ValueError, match="hidden_size"):
        MetaLearnerLSTM(hidden_size=0)
    with pytest.raises(ValueError, match="p must be positive"):
        MetaLearnerLSTM(p=-1.0)


def test_fresh_update_is_a_small_gradient_step_with_slight_shrinkage():
    torch.manual_seed(0)
    meta = MetaLearnerLSTM()
    theta = torch.randn(1000)
    grad = torch.randn(1000)
    new_theta, _ = meta_update(meta.weights(), initial_state(1000, 20), grad, torch.tensor(1.0),
                               theta)
    # Solve theta_t = f theta - i g per coordinate with a least-squares fit of (f, i).
    design = torch.stack((theta, -grad), dim=1)
    f, i = torch.linalg.lstsq(design, new_theta.unsqueeze(1)).solution.squeeze(1).tolist()
    assert 0.98 < f < 0.999
    assert 0.006 < i < 0.02


def test_rows_are_independent_so_any_chunking_gives_the_same_result():
    torch.manual_seed(1)
    meta = MetaLearnerLSTM()
    state = torch.randn(50, 42)
    grad, theta = torch.randn(50), torch.randn(50)
    constants = prepare_step(meta.weights(), torch.tensor(0.7), torch.float32)
    whole = update_rows_differentiable(constants, state, grad, theta)
    parts = [update_rows_differentiable(constants, state[a:b], grad[a:b], theta[a:b])
             for a, b in ((0, 17), (17, 18), (18, 50))]
    torch.testing.assert_close(whole[0], torch.cat([p[0] for p in parts]))
    torch.testing.assert_close(whole[1], torch.cat([p[1] for p in parts]))


def test_the_chunked_forward_gives_the_same_numbers(monkeypatch):
    torch.manual_seed(2)
    meta = MetaLearnerLSTM()
    state, grad, theta = torch.randn(50, 42), torch.randn(50), torch.randn(50)
    constants = prepare_step(meta.weights(), torch.tensor(0.7), torch.float32)
    whole = update_rows_differentiable(constants, state, grad, theta)
    monkeypatch.setattr(policy, "FORWARD_CHUNK_ROWS", 16)  # 50 rows: 16, 16, 16, 2
    chunked = update_rows_chunked(constants, state, grad, theta)
    torch.testing.assert_close(chunked[0], whole[0])  # matrix products of other shapes: 1 ulp
    torch.testing.assert_close(chunked[1], whole[1])


def test_update_is_pure():
    meta = MetaLearnerLSTM()
    state, grad, theta = torch.randn(5, 42), torch.randn(5), torch.randn(5)
    copies = [t.clone() for t in (state, grad, theta)]
    meta_update(meta.weights(), state, grad, torch.tensor(0.3), theta)
    for original, copy in zip((state, grad, theta), copies):
        assert torch.equal(original, copy)


def test_state_layout_holds_h1_c1_and_pre_activations():
    torch.manual_seed(2)
    meta = MetaLearnerLSTM()
    theta, grad = torch.randn(3), torch.randn(3)
    _, state = meta_update(meta.weights(), initial_state(3, 20), grad, torch.tensor(1.0), theta)
    h1, c1, gate_pre = state[:, :20], state[:, 20:40], state[:, 40:]
    assert (h1.abs() < 1).all() and (c1.abs() > 0).all()
    # The pre-activations sit near the initial biases (weights are tiny).
    assert torch.allclose(gate_pre, meta.meta_bias.detach().expand(3, 2), atol=0.1)
