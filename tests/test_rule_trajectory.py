"""First-order trajectories: the same meta-gradients as per-step nodes, a tape of O(1) per step."""

import higher
import pytest
import torch

from learned_optim import LSTMMetaOptimizer
from learned_optim.rule import policy
from learned_optim.rule.math import initial_state, prepare_step, update_rows
from learned_optim.rule.tape import RuleTrajectory, update_rows_differentiable
from tests.test_rule_backward import (
    DOUBLE,
    _gradients_both_preprocessing_branches,
    _trained_looking_meta_learner,
)

ROWS = 257


def _chain_inputs(rows: int = ROWS, steps: int = 5, device: str = "cpu"):
    meta = _trained_looking_meta_learner(seed=5).to(device)
    generator = torch.Generator().manual_seed(6)
    state = (torch.randn(rows, meta.state_width, dtype=DOUBLE, generator=generator) * 0.5)
    theta = torch.randn(rows, dtype=DOUBLE, generator=generator)
    grads = [_gradients_both_preprocessing_branches(rows, generator).to(device) * (1 + t)
             for t in range(steps)]
    losses = [torch.tensor(2.0 - 0.3 * t, dtype=DOUBLE, device=device) for t in range(steps)]
    return (meta, state.to(device).requires_grad_(), theta.to(device).requires_grad_(), grads,
            losses)


def _meta_gradients(use_chain: bool, *, intermediate: bool = False, device: str = "cpu",
                    **chain_options):
    """d(meta-loss) w.r.t. anchor state, anchor theta and the meta-learner's weights."""
    meta, state, theta, grads, losses = _chain_inputs(device=device)
    chain = RuleTrajectory(state, theta, **chain_options) if use_chain else None
    probe = torch.linspace(-1, 1, ROWS, dtype=DOUBLE, device=device)
    param, rows, meta_loss = theta, state, 0.0
    for grad, loss in zip(grads, losses):
        constants = prepare_step(meta.weights(), loss, DOUBLE, device)
        if chain is None:
            param, rows = update_rows(constants, rows, grad, param)  # recorded op by op
        else:
            param, rows = chain.step(constants, grad)
        if intermediate:  # a loss on every step, not only on the last
            meta_loss = meta_loss + (param * probe).sum()
    meta_loss = meta_loss + (param * probe).sum() + 0.1 * (rows * rows).sum()
    return torch.autograd.grad(meta_loss, [state, theta, *meta.parameters()])


def _assert_same(ours, reference):
    for a, b in zip(ours, reference):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_chain_gradients_equal_the_recorded_per_step_tape():
    _assert_same(_meta_gradients(True), _meta_gradients(False))


def test_chunks_and_segments_give_the_same_gradients(monkeypatch):
    reference = _meta_gradients(False)
    monkeypatch.setattr(policy, "REPLAY_CHUNK_BYTES", 1)  # minimum: 256-row chunks
    monkeypatch.setattr(policy, "MIN_REPLAY_CHUNK_ROWS", 40)  # 257 rows: 7 chunks
    _assert_same(_meta_gradients(True), reference)
    _assert_same(_meta_gradients(True, segment_steps=2), reference)  # anchors at 0, 2, 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chain_replays_in_one_chunk_and_matches_the_cpu_tape():
    rows = _chain_inputs()[1].shape[0]
    assert policy.replay_chunk_bytes(torch.device("cuda")) > 1000 * rows * 5
    ours = [g.cpu() for g in _meta_gradients(True, device="cuda")]
    for a, b in zip(ours, _meta_gradients(False)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_losses_on_intermediate_steps_are_exact():
    _assert_same(_meta_gradients(True, intermediate=True),
                 _meta_gradients(False, intermediate=True))


def test_double_backward_is_exact():
    meta, state, theta, grads, losses = _chain_inputs(rows=5, steps=3)
    grads = [g.abs() + 0.05 for g in grads]  # off the preprocessing's kink
    leaves = [t.detach().clone().requires_grad_()
              for t in prepare_step(meta.weights(), losses[0], DOUBLE)[:-1]]

    def chain_output(state, theta, *constant_tensors):
        constants = prepare_step(meta.weights(), losses[0], DOUBLE)._make(
            (*constant_tensors, meta.p))
        chain = RuleTrajectory(state, theta)
        for grad in grads:
            param, rows = chain.step(constants, grad)
        return param, rows

    assert torch.autograd.gradgradcheck(chain_output, (state, theta, *leaves))


def _saved_bytes_per_row(use_chain: bool, steps: int, rows: int = 65536) -> float:
    """Bytes autograd keeps per coordinate for ``steps`` updates (unique storages)."""
    meta = _trained_looking_meta_learner().float()
    theta = torch.randn(rows, requires_grad=True)
    state = initial_state(rows, meta.hidden_size)
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    outputs = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chain = RuleTrajectory(state, theta) if use_chain else None
        param = theta
        for _ in range(steps):
            constants = prepare_step(meta.weights(), torch.tensor(1.0), torch.float32)
            grad = torch.randn(rows) * 1e-2
            if chain is None:
                param, state = update_rows_differentiable(constants, state, grad, param)
            else:
                param, state = chain.step(constants, grad)
            outputs.append(param)
    return sum(storages.values()) / rows


def test_a_chain_saves_the_anchor_and_a_gradient_per_step():
    chain = _saved_bytes_per_row(True, steps=12)
    per_step = _saved_bytes_per_row(False, steps=12)
    # anchor: state 168 + parameter 4 bytes; then 4 bytes of gradient a step (+ the step
    # constants, 7 KB a step, under 2 bytes a row in all at this size)
    assert 168 + 4 + 12 * 4 <= chain < 168 + 4 + 12 * 4 + 4
    assert 12 * 176 <= per_step < 12 * 180


def test_bad_inputs_are_refused():
    meta, state, theta, grads, losses = _chain_inputs(rows=4, steps=1)
    constants = prepare_step(meta.weights(), losses[0], DOUBLE)
    with pytest.raises(ValueError, match="must not require grad"):
        RuleTrajectory(state, theta).step(constants, grads[0].requires_grad_())
    with pytest.raises(ValueError, match=r"grad has shape \(3,\)"):
        RuleTrajectory(state, theta).step(constants, grads[0].detach()[:3])
    with pytest.raises(ValueError, match="anchor must be"):
        RuleTrajectory(state[:3], theta)
    with pytest.raises(ValueError, match="segment_steps"):
        RuleTrajectory(state, theta, segment_steps=0)


def _twin_meta_gradients(use_chain: bool, replace_at: int | None = None):
    """First-order meta-gradients of a small MLP's query loss after 4 inner steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(),
                                torch.nn.Linear(12, 3)).double()
    meta = _trained_looking_meta_learner(seed=2)
    x = torch.randn(30, 6, dtype=DOUBLE)
    y = torch.randint(0, 3, (30,))
    chains = []
    opt = LSTMMetaOptimizer(model.parameters(), meta, first_order=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        if not use_chain:
            diffopt._first_order_path = lambda flat_grad: None
        for step in range(4):
            params = None
            if step == replace_at:  # a user's own edit of the fast weights between steps
                params = [p * 1.0 for p in fmodel.fast_params]
            loss = torch.nn.functional.cross_entropy(fmodel(x[:20], params=params), y[:20])
            diffopt.step(loss, params=params)
            chains.append(id(next(iter(diffopt._chains[0].values()), None)))
        query = torch.nn.functional.cross_entropy(fmodel(x[20:]), y[20:])
        grads = torch.autograd.grad(query, [*meta.parameters(), *model.parameters()])
    return grads, chains


def test_the_twin_records_first_order_steps_on_one_chain():
    ours, chains = _twin_meta_gradients(True)
    reference, _ = _twin_meta_gradients(False)
    assert len(set(chains)) == 1  # one trajectory for the four steps
    _assert_same(ours, reference)


def test_the_twin_starts_a_new_chain_when_a_parameter_is_replaced():
    ours, chains = _twin_meta_gradients(True, replace_at=2)
    reference, _ = _twin_meta_gradients(False, replace_at=2)
    assert chains[0] == chains[1] != chains[2] == chains[3]
    _assert_same(ours, reference)


def test_second_order_steps_do_not_use_a_chain():
    model = torch.nn.Linear(3, 1)
    opt = LSTMMetaOptimizer(model.parameters(), first_order=False)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(fmodel(torch.ones(2, 3)).pow(2).mean())
        assert not diffopt._chains[0]
