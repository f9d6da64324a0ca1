"""LSTMMetaOptimizer as a torch.optim drop-in."""

import copy

import pytest
import torch
from rule_chains import two_steps_with_a_rule_change  # tests/rule_chains.py
from torch import nn
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM


def sgd_like_meta_learner(lr: float) -> MetaLearnerLSTM:
    """Gates forced to f = 1 and i = lr: the update rule becomes plain SGD."""
    meta = MetaLearnerLSTM()
    with torch.no_grad():
        meta.meta_weight.zero_()
        meta.meta_bias.copy_(torch.tensor([40.0, torch.logit(torch.tensor(lr)).item()]))
    return meta


def digits_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train_steps(model, opt, inputs, targets, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        if isinstance(opt, LSTMMetaOptimizer):
            opt.step(loss=loss)
        else:
            opt.step()
        losses.append(loss.item())
    return losses


def test_fresh_meta_learner_lowers_the_training_loss_on_digits(digits):
    inputs, labels = digits
    torch.manual_seed(0)
    model = digits_mlp()
    opt = LSTMMetaOptimizer(model.parameters())
    losses = train_steps(model, opt, inputs[:100], labels[:100], 13)
    # Twelve steps of the paper's horizon, then the loss they reached.
    assert losses[-1] < losses[0] - 0.01  # measured: 2.327 -> 2.308
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_forced_gates_reproduce_sgd_step_for_step(digits):
    inputs, labels = digits
    lr = 0.1
    model = digits_mlp()
    reference = copy.deepcopy(model)
    opt = LSTMMetaOptimizer(model.parameters(), sgd_like_meta_learner(lr))
    sgd = torch.optim.SGD(reference.parameters(), lr=lr)
    for _ in range(12):
        train_steps(model, opt, inputs[:64], labels[:64], 1)
        train_steps(reference, sgd, inputs[:64], labels[:64], 1)
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_step_without_loss_explains_both_ways():
    model = nn.Linear(2, 1)
    opt = LSTMMetaOptimizer(model.parameters(), MetaLearnerLSTM())  # the paper's rule needs it
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match=r"step\(loss=loss\).*closure"):
        opt.step()


def test_closure_loss_and_keyword_loss_give_the_same_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    model_a = nn.Linear(3, 1)
    model_b = copy.deepcopy(model_a)
    meta = MetaLearnerLSTM()
    opt_a = LSTMMetaOptimizer(model_a.parameters(), meta)
    opt_b = LSTMMetaOptimizer(model_b.parameters(), meta)

    def closure():
        opt_a.zero_grad()
        loss = F.mse_loss(model_a(x), y)
        loss.backward()
        return loss

    returned = opt_a.step(closure)
    loss_b = F.mse_loss(model_b(x), y)
    loss_b.backward()
    opt_b.step(loss=loss_b)
    assert returned.item() == pytest.approx(loss_b.item())
    torch.testing.assert_close(model_a.weight, model_b.weight, rtol=0, atol=0)


def test_parameters_without_gradient_are_skipped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = LSTMMetaOptimizer(model.parameters())
    unused = model[0].weight
    before = unused.detach().clone()
    loss = model[1](torch.randn(4, 3)).pow(2).mean()  # model[0] is not used
    loss.backward()
    opt.step(loss=loss)
    assert torch.equal(unused, before)
    assert torch.count_nonzero(opt.state[unused]["lstm_state"]) == 0
    assert torch.count_nonzero(opt.state[model[1].weight]["lstm_state"]) > 0


@pytest.mark.parametrize("chunk_size", [1, 7, 100_000])
def test_chunking_does_not_change_the_result(chunk_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 2))
    reference = copy.deepcopy(model)
    meta = MetaLearnerLSTM()
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    for net, size in ((model, chunk_size), (reference, 4096)):
        opt = LSTMMetaOptimizer(net.parameters(), meta, chunk_size=size)
        for _ in range(3):
            opt.zero_grad()
            loss = F.mse_loss(net(x), y)
            loss.backward()
            opt.step(loss=loss)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_non_contiguous_parameter_is_updated_like_its_contiguous_copy():
    torch.manual_seed(0)
    base = torch.randn(4, 3)
    strided = nn.Parameter(base.t())  # non-contiguous view
    dense = nn.Parameter(base.t().contiguous())
    meta = MetaLearnerLSTM()
    for param in (strided, dense):
        opt = LSTMMetaOptimizer([param], meta)
        loss = (param * torch.arange(12.0).view(3, 4)).sin().sum()
        loss.backward()
        opt.step(loss=loss)
    assert not strided.is_contiguous()
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    model = nn.Linear(4, 2)
    meta = MetaLearnerLSTM()
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    clone = copy.deepcopy(model)
    restored = LSTMMetaOptimizer(clone.parameters(), meta)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    for net, optimizer in ((model, opt), (clone, restored)):
        optimizer.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        optimizer.step(loss=loss)
    torch.testing.assert_close(model.weight, clone.weight, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[model.weight]["lstm_state"],
                               restored.state[clone.weight]["lstm_state"], rtol=0, atol=0)


def test_load_state_dict_refuses_state_of_the_wrong_shape():
    model = nn.Linear(4, 2)
    opt = LSTMMetaOptimizer(model.parameters())
    loss = model(torch.ones(1, 4)).sum()
    loss.backward()
    opt.step(loss=loss)
    other = LSTMMetaOptimizer(nn.Linear(4, 2).parameters(), MetaLearnerLSTM(hidden_size=8))
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(8, 42\), expected \(8, 18\)"):
        other.load_state_dict(opt.state_dict(), rule="keep")
    # The default rule's gradient moments must fit their parameter too.
    saved = opt.state_dict()
    saved["state"][1]["grad_moments"] = torch.zeros(2, 3)
    fresh = LSTMMetaOptimizer(nn.Linear(4, 2).parameters())
    with pytest.raises(ValueError, match=r"parameter 1 has grad_moments of shape \(2, 3\), "
                                         r"expected \(2, 2\) for a parameter of shape \(2,\)"):
        fresh.load_state_dict(saved, rule="keep")


def test_loaded_state_is_not_changed_by_later_steps():
    # The fused kernels update the rule's state and the gradient moments in place: what was
    # loaded is copied first, so the dict given (and the optimizer that saved it) stay as
    # they were.
    model = nn.Linear(4, 2)
    opt = LSTMMetaOptimizer(model.parameters())  # the general rule: moments kept
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    before = {key: value.clone() for key, value in saved["state"][0].items()
              if isinstance(value, torch.Tensor)}
    assert set(before) == {"lstm_state", "grad_moments"}
    other = LSTMMetaOptimizer(model.parameters())
    other.load_state_dict(saved, rule="keep")
    for _ in range(2):
        other.step()
    for key, value in before.items():
        assert torch.equal(saved["state"][0][key], value), key
    assert not torch.equal(other.state[model.weight]["grad_moments"], before["grad_moments"])


def test_reset_state_starts_a_new_task():
    model = nn.Linear(3, 1)
    opt = LSTMMetaOptimizer(model.parameters())
    loss = model(torch.ones(2, 3)).sum()
    loss.backward()
    opt.step(loss=loss)
    opt.reset_state()
    assert len(opt.state) == 0
    opt.step(loss=loss)
    assert opt.state[model.weight]["lstm_state"].shape == (3, 42)


def test_add_param_group_keeps_existing_state_and_updates_the_new_group():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = LSTMMetaOptimizer(first.parameters())
    loss = first(torch.ones(1, 2)).sum()
    loss.backward()
    opt.step(loss=loss)
    kept = opt.state[first.weight]["lstm_state"].clone()
    opt.add_param_group({"params": list(second.parameters())})
    before = second.weight.detach().clone()
    opt.zero_grad()
    loss = second(first(torch.ones(1, 2))).sum()
    loss.backward()
    first.weight.grad = None  # only the new group moves
    first.bias.grad = None
    opt.step(loss=loss)
    assert torch.equal(opt.state[first.weight]["lstm_state"], kept)
    assert not torch.equal(second.weight, before)


def test_zero_grad_sets_to_none():
    model = nn.Linear(2, 1)
    opt = LSTMMetaOptimizer(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.zero_grad(set_to_none=True)
    assert model.weight.grad is None
    model(torch.ones(1, 2)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert torch.count_nonzero(model.weight.grad) == 0


def test_float64_and_mixed_precision_parameters():
    torch.manual_seed(0)
    single = nn.Parameter(torch.randn(5))
    double = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = LSTMMetaOptimizer([single, double])
    loss = single.pow(2).sum() + double.pow(2).sum()
    loss.backward()
    before = (single.detach().clone(), double.detach().clone())
    opt.step(loss=loss)
    assert opt.state[double]["lstm_state"].dtype == torch.float64
    assert opt.state[single]["lstm_state"].dtype == torch.float32
    # Minimising |theta|^2: both move towards zero.
    assert single.norm() < before[0].norm() and double.norm() < before[1].norm()


def test_non_finite_loss_raises_and_leaves_parameters_untouched():
    model = nn.Linear(3, 1)
    opt = LSTMMetaOptimizer(model.parameters())
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    before = model.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="loss is nan"):
        opt.step(loss=torch.tensor(float("nan")))
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize("native", [True, False], ids=["one-kernel-call", "torch-operators"])
def test_non_finite_gradient_raises_before_any_parameter_moves(native, monkeypatch):
    if not native:
        monkeypatch.setenv("LEARNED_OPTIM_COMPILE", "0")
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(1, 2))
    opt = LSTMMetaOptimizer([{"params": model[:2].parameters()},
                             {"params": model[2].parameters()}])
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    model[1].bias.grad[0] = float("inf")
    model[2].weight.grad[1] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"parameter 3 of param group 0 \(shape \(1,\)\)"):
        opt.step(loss=loss)
    model[1].bias.grad[0] = 0.0
    # the first group is fine now, and still nothing moves
    with pytest.raises(FloatingPointError, match=r"parameter 0 of param group 1 \(shape \(2, 1"):
        opt.step(loss=loss)
    for param, old in zip(model.parameters(), before):
        assert torch.equal(param, old)


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = LSTMMetaOptimizer(embedding.parameters())
    loss = embedding(torch.tensor([1, 2])).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step(loss=loss)


def test_complex_parameters_are_refused():
    with pytest.raises(TypeError, match="complex"):
        LSTMMetaOptimizer([nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_non_scalar_loss_is_refused():
    model = nn.Linear(3, 1)
    opt = LSTMMetaOptimizer(model.parameters())
    out = model(torch.ones(2, 3))
    out.sum().backward()
    with pytest.raises(ValueError, match="must be a scalar"):
        opt.step(loss=out)


def test_grad_scaler_step_matches_an_unscaled_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    model = nn.Linear(4, 1)
    reference = copy.deepcopy(model)
    meta = MetaLearnerLSTM()
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    ref_opt = LSTMMetaOptimizer(reference.parameters(), meta)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt, loss=loss)
        scaler.update()
        ref_opt.zero_grad()
        ref_loss = F.mse_loss(reference(x), y)
        ref_loss.backward()
        ref_opt.step(loss=ref_loss)
    torch.testing.assert_close(model.weight, reference.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    model = nn.Linear(4, 1)
    gpu_model = copy.deepcopy(model).cuda()
    meta = MetaLearnerLSTM()
    for net, data in ((model, (x, y)), (gpu_model, (x.cuda(), y.cuda()))):
        opt = LSTMMetaOptimizer(net.parameters(), meta)
        for _ in range(3):
            opt.zero_grad()
            loss = F.mse_loss(net(data[0]), data[1])
            loss.backward()
            opt.step(loss=loss)
    torch.testing.assert_close(model.weight, gpu_model.weight.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("twin", [False, True], ids=["drop-in", "higher-twin"])
def test_a_rule_changed_in_place_between_steps_is_not_served_from_the_cache(twin):
    # Both shells keep the rule's loss-free constants between steps (the twin for an
    # episode); a rule whose weights change in place (an outer meta-training step,
    # load_state_dict, an online meta-update) is read again.
    in_place = two_steps_with_a_rule_change(in_place=True, twin=twin)
    new_module = two_steps_with_a_rule_change(in_place=False, twin=twin)
    assert all(torch.equal(a, b) for a, b in zip(in_place, new_module))


def test_the_cached_constants_equal_prepare_step_and_the_paper_bias():
    from learned_optim.rule.math import prepare_step, preprocess

    torch.manual_seed(1)
    rule = MetaLearnerLSTM()
    with torch.no_grad():
        for p in rule.parameters():
            p.normal_()
    opt = LSTMMetaOptimizer(nn.Linear(2, 2).parameters(), rule)
    hidden = rule.hidden_size
    for loss in (torch.tensor(2.7), torch.tensor(1e-6), torch.tensor(-0.4)):
        cached = opt._rule_cache.constants(rule.weights(), loss, torch.float32,
                                           torch.device("cpu"))
        direct = prepare_step(rule.weights(), loss, torch.float32)
        for a, b in zip(cached[:-1], direct[:-1]):
            assert torch.equal(a, b)
        # the gate bias as the paper's layer 1 reads the loss: bias + W_loss preprocess(loss),
        # in the kernels' gate order (i, f, o, 2 g)
        paper = rule.bias + rule.weight_ih[:, 2:] @ preprocess(loss, rule.p)
        i, f, g, o = paper.split(hidden)
        torch.testing.assert_close(cached.gate_bias, torch.cat((i, f, o, 2 * g)),
                                   rtol=1e-6, atol=1e-7)
    assert len(opt._rule_cache.rules) == 1  # one rule, one (dtype, device): built once
