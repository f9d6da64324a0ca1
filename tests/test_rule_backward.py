"""The hand-written backward of update_rows: exact gradients, less tape memory."""

import pytest
import torch

from learned_optim.metalearner import MetaLearnerLSTM
from learned_optim.rule import policy
from learned_optim.rule.math import StepConstants, prepare_step
from learned_optim.rule.tape import update_rows_differentiable, update_rows_recomputed

DOUBLE = torch.float64


def _trained_looking_meta_learner(seed: int = 0) -> MetaLearnerLSTM:
    """A meta-learner moved away from its initialisation, so that no gate is saturated."""
    torch.manual_seed(seed)
    meta = MetaLearnerLSTM().to(DOUBLE)
    with torch.no_grad():
        for weight in meta.parameters():
            weight.add_(torch.randn_like(weight) * 0.3)
        meta.meta_bias.copy_(torch.tensor([2.0, -2.0]))
    return meta


def _gradients_both_preprocessing_branches(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Gradients of ordinary size and, in the first rows, below e^-p (the linear branch)."""
    grad = torch.randn(rows, dtype=DOUBLE, generator=generator) * 1e-2
    grad[:4] = torch.tensor([1e-5, -2e-5, 3e-6, -4e-7], dtype=DOUBLE)
    return grad


def _two_step_gradients(recompute: bool, second_order: bool, rows: int = 257):
    """Meta-gradients through two chained updates, as meta-training takes them."""
    meta = _trained_looking_meta_learner()
    generator = torch.Generator().manual_seed(1)
    state = (torch.randn(rows, meta.state_width, dtype=DOUBLE, generator=generator) * 0.5)
    theta = torch.randn(rows, dtype=DOUBLE, generator=generator).requires_grad_()
    grad = _gradients_both_preprocessing_branches(rows, generator).requires_grad_(second_order)
    loss = torch.tensor(1.6, dtype=DOUBLE, requires_grad=second_order)
    state.requires_grad_()
    constants = prepare_step(meta.weights(), loss, DOUBLE)
    theta_1, state_1 = update_rows_differentiable(constants, state, grad, theta,
                                                  recompute=recompute)
    theta_2, state_2 = update_rows_differentiable(constants, state_1, grad * 0.5, theta_1,
                                                  recompute=recompute)
    probe = torch.linspace(-1, 1, rows, dtype=DOUBLE)
    meta_loss = (theta_2 * probe).sum() + 0.1 * (state_2 * state_2).sum()
    inputs = [state, theta, *meta.parameters()] + ([grad, loss] if second_order else [])
    return torch.autograd.grad(meta_loss, inputs)


@pytest.mark.parametrize("second_order", [False, True], ids=["first-order", "second-order"])
def test_recomputed_backward_equals_the_recorded_one(second_order):
    recomputed = _two_step_gradients(recompute=True, second_order=second_order)
    recorded = _two_step_gradients(recompute=False, second_order=second_order)
    for ours, reference in zip(recomputed, recorded):
        assert reference.abs().max() > 0
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def _single_step_inputs(rows: int = 12):
    meta = _trained_looking_meta_learner(seed=3)
    generator = torch.Generator().manual_seed(4)
    constants = prepare_step(meta.weights(), torch.tensor(0.7, dtype=DOUBLE), DOUBLE)
    leaves = [t.detach().clone().requires_grad_() for t in constants[:-1]]
    state = torch.randn(rows, meta.state_width, dtype=DOUBLE, generator=generator) * 0.5
    grad = _gradients_both_preprocessing_branches(rows, generator)
    theta = torch.randn(rows, dtype=DOUBLE, generator=generator)
    tensors = [t.requires_grad_() for t in (state, grad, theta)]

    def step(state, grad, theta, *constant_tensors):
        return update_rows_recomputed(
            StepConstants(*constant_tensors, p=constants.p), state, grad, theta)

    return step, (*tensors, *leaves)


def test_gradients_match_finite_differences_for_every_input():
    step, inputs = _single_step_inputs()
    assert torch.autograd.gradcheck(step, inputs)


def test_double_backward_is_exact():
    step, inputs = _single_step_inputs(rows=6)
    # gradgradcheck perturbs every input: keep the gradients off the preprocessing's kink.
    inputs[1].data.copy_(torch.linspace(-0.3, 0.3, 6, dtype=DOUBLE) + 0.05)
    assert torch.autograd.gradgradcheck(step, inputs)


def test_backward_works_when_only_one_output_is_used():
    step, inputs = _single_step_inputs()
    new_theta, _ = step(*inputs)
    from_theta = torch.autograd.grad(new_theta.sum(), inputs[:3])
    _, new_state = step(*inputs)
    from_state = torch.autograd.grad(new_state.sum(), inputs[:3])
    assert all(g.abs().sum() > 0 for g in from_theta + from_state)


def test_chunks_of_rows_give_the_same_gradients(monkeypatch):
    whole = _two_step_gradients(recompute=True, second_order=True)
    monkeypatch.setattr(policy, "BACKWARD_CHUNK_ROWS", 50)  # 257 rows: 6 chunks
    chunked = _two_step_gradients(recompute=True, second_order=True)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _saved_bytes_per_row(recompute: bool, rows: int = 4096) -> float:
    """Bytes autograd keeps per coordinate for one update step (unique storages)."""
    meta = MetaLearnerLSTM()
    state = torch.zeros(rows, meta.state_width)
    grad = torch.randn(rows) * 1e-2
    theta = torch.randn(rows, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        constants = prepare_step(meta.weights(), torch.tensor(1.0), torch.float32)
        update_rows_differentiable(constants, state, grad, theta, recompute=recompute)
    return sum(storages.values()) / rows


def test_the_step_saves_only_its_inputs():
    ours = _saved_bytes_per_row(recompute=True)
    recorded = _saved_bytes_per_row(recompute=False)
    # state (42 floats), gradient and parameter: 176 bytes, plus the step's small constants
    assert 176 <= ours < 180
    assert recorded > 4 * ours
