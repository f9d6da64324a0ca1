"""LSTMMetaOptimizer keeps torch.optim's object contract: copies, pickles, state dicts, hooks,
``opt.state`` as the only state, per-group ``lr``/``weight_decay`` and schedulers."""

import copy
import io
import math
import pickle

import higher
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.checkpoint import load_update_rule
from learned_optim.metalearner import rule_fingerprint


def regression(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    return model, x, y


def step(model, opt, x, y, *, with_loss=True):
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    if with_loss:
        opt.step(loss=loss)
    else:
        opt.step()
    return loss.item()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for ours, theirs in zip(a, b):
        assert torch.equal(ours, theirs)


def trained(meta=None, steps=3, **kwargs):
    model, x, y = regression()
    opt = LSTMMetaOptimizer(model.parameters(), meta, **kwargs)
    for _ in range(steps):
        step(model, opt, x, y)
    return model, opt, x, y


# --- copies and pickles --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_rule_and_continue_identically(how):
    model, opt, x, y = trained(MetaLearnerLSTM(hidden_size=7), chunk_size=5, first_order=False)
    if how == "deepcopy":
        model_copy, opt_copy = copy.deepcopy((model, opt))
    else:
        model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    assert opt_copy.meta_learner.hidden_size == 7
    assert (opt_copy.first_order, opt_copy.chunk_size) == (False, 5)
    assert rule_fingerprint(opt_copy.meta_learner) == rule_fingerprint(opt.meta_learner)
    step(model, opt, x, y)
    step(model_copy, opt_copy, x, y)
    assert_same(model.parameters(), model_copy.parameters())


# --- state_dict carries the rule -------------------------------------------------------------

def test_fresh_optimizer_loading_a_state_dict_continues_bit_identically():
    model, opt, x, y = trained(MetaLearnerLSTM(hidden_size=9))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    clone = copy.deepcopy(model)
    fresh = LSTMMetaOptimizer(clone.parameters())  # a random rule of hidden size 20
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.meta_learner.hidden_size == 9
    assert rule_fingerprint(fresh.meta_learner) == rule_fingerprint(opt.meta_learner)
    for _ in range(2):
        step(model, opt, x, y)
        step(clone, fresh, x, y)
    assert_same(model.parameters(), clone.parameters())


def test_state_dict_of_another_rule_is_refused_naming_the_difference():
    _, opt, _, _ = trained(MetaLearnerLSTM())
    other = LSTMMetaOptimizer(regression()[0].parameters(), MetaLearnerLSTM())
    with pytest.raises(ValueError, match=r"another update rule: it differs in weights"):
        other.load_state_dict(opt.state_dict())
    smaller = LSTMMetaOptimizer(regression()[0].parameters(), MetaLearnerLSTM(hidden_size=8))
    with pytest.raises(ValueError, match=r"hyper-parameters .*'hidden_size': 20"):
        smaller.load_state_dict(opt.state_dict())


def test_rule_keyword_loads_or_keeps_the_rule():
    _, opt, _, _ = trained(MetaLearnerLSTM())
    mine = MetaLearnerLSTM()
    other = LSTMMetaOptimizer(regression()[0].parameters(), mine)
    other.load_state_dict(opt.state_dict(), rule="keep")
    assert other.meta_learner is mine
    other.load_state_dict(opt.state_dict(), rule="load")
    assert rule_fingerprint(other.meta_learner) == rule_fingerprint(opt.meta_learner)
    assert other.meta_learner is not opt.meta_learner


def test_shipped_rule_is_stored_by_name_and_fingerprint():
    model, x, y = regression()
    opt = LSTMMetaOptimizer.from_pretrained("omniglot-5w1s", model.parameters())
    step(model, opt, x, y)
    identity = opt.state_dict()["rule"]
    assert identity["name"] == "omniglot-5w1s" and identity["weights"] is None
    assert identity["fingerprint"] == rule_fingerprint(load_update_rule("omniglot-5w1s"))
    clone = copy.deepcopy(model)
    fresh = LSTMMetaOptimizer(clone.parameters())
    fresh.load_state_dict(opt.state_dict())
    step(model, opt, x, y)
    step(clone, fresh, x, y)
    assert_same(model.parameters(), clone.parameters())
    # A shipped rule that has been trained further is stored with its weights.
    with torch.no_grad():
        opt.meta_learner.meta_bias.add_(0.1)
    assert opt.state_dict()["rule"]["weights"] is not None


# --- opt.state is the only state ---------------------------------------------------------------

def test_clearing_state_starts_afresh_like_a_new_optimizer():
    model, opt, x, y = trained(MetaLearnerLSTM())
    reference = copy.deepcopy(model)
    opt.state.clear()
    assert opt.state_dict()["state"] == {}
    step(model, opt, x, y)
    step(reference, LSTMMetaOptimizer(reference.parameters(), opt.meta_learner), x, y)
    assert_same(model.parameters(), reference.parameters())


def test_writing_the_lstm_state_is_what_the_next_step_uses():
    model, opt, x, y = trained(MetaLearnerLSTM())
    reference = copy.deepcopy(model)
    fresh = LSTMMetaOptimizer(reference.parameters(), opt.meta_learner)
    for param in model.parameters():  # replace the tensor (not in place): a new task's zeros
        opt.state[param]["lstm_state"] = torch.zeros_like(opt.state[param]["lstm_state"])
    step(model, opt, x, y)
    step(reference, fresh, x, y)
    assert_same(model.parameters(), reference.parameters())
    # In-place edits of the views count too.
    opt.state[model[0].weight]["lstm_state"].fill_(0.5)
    step(model, opt, x, y)
    assert torch.count_nonzero(opt.state[model[0].weight]["lstm_state"] == 0.5) == 0


def test_removing_a_param_group_works():
    first, second = nn.Linear(3, 3), nn.Linear(3, 1)
    opt = LSTMMetaOptimizer([{"params": first.parameters()}, {"params": second.parameters()}])
    for _ in range(2):
        opt.zero_grad()
        loss = second(first(torch.ones(2, 3))).sum()
        loss.backward()
        opt.step(loss=loss)
    opt.param_groups.pop(0)
    before = first.weight.detach().clone()
    opt.zero_grad()
    loss = second(first(torch.ones(2, 3))).sum()
    loss.backward()
    kept = opt.state[second.weight]["lstm_state"].clone()
    opt.step(loss=loss)
    assert torch.equal(first.weight, before)
    assert not torch.equal(opt.state[second.weight]["lstm_state"], kept)


# --- hooks and non-parameter state ---------------------------------------------------------------

def test_load_state_dict_pre_hooks_run_before_any_check():
    _, opt, _, _ = trained(MetaLearnerLSTM())
    saved = opt.state_dict()
    renamed = {"state": {k: {"old_name": v["lstm_state"]} for k, v in saved["state"].items()},
               "param_groups": saved["param_groups"], "rule": saved["rule"]}
    renamed["rule"] = dict(saved["rule"], fingerprint="not this rule")
    other = LSTMMetaOptimizer(regression()[0].parameters(), opt.meta_learner)
    calls = []

    def translate(optimizer, state_dict):
        calls.append("pre")
        state_dict["state"] = {k: {"lstm_state": v["old_name"]}
                               for k, v in state_dict["state"].items()}
        state_dict["rule"] = saved["rule"]
        return state_dict

    other.register_load_state_dict_pre_hook(translate)
    other.register_load_state_dict_post_hook(lambda optimizer: calls.append("post"))
    other.load_state_dict(renamed)
    assert calls == ["pre", "post"]
    for (_, ours), theirs in zip(saved["state"].items(), other.state.values()):
        assert torch.equal(ours["lstm_state"], theirs["lstm_state"])


def test_state_dict_post_hooks_see_the_rule():
    _, opt, _, _ = trained(MetaLearnerLSTM())
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "seen": "rule" in sd})
    assert opt.state_dict()["seen"] is True


def test_non_parameter_state_entry_round_trips():
    model, opt, x, y = trained(MetaLearnerLSTM())
    opt.state["extra"] = 1
    saved = opt.state_dict()
    other = LSTMMetaOptimizer(copy.deepcopy(model).parameters(), opt.meta_learner)
    other.load_state_dict(saved)
    assert other.state["extra"] == 1
    step(model, opt, x, y)  # the step ignores it


# --- meta device and zero gradients -------------------------------------------------------------

def test_meta_device_parameters_step_like_sgd():
    model = nn.Linear(5, 3, device="meta")
    opt = LSTMMetaOptimizer(model.parameters())
    loss = model(torch.ones(2, 5, device="meta")).sum()
    loss.backward()
    opt.step(loss=loss)
    assert model.weight.device.type == "meta" and model.weight.shape == (3, 5)
    assert opt.state[model.weight]["lstm_state"].shape == (15, 42)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # what torch's optimizers do
    sgd.step()


def test_zero_gradient_still_moves_through_the_forget_gate():
    meta = MetaLearnerLSTM()
    theta = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = LSTMMetaOptimizer([theta], meta)
    theta.grad = torch.zeros(3)
    opt.step(loss=torch.tensor(0.5))
    forget = torch.sigmoid(opt.state[theta]["lstm_state"][:, -2])  # f_t = sigmoid(f_pre)
    torch.testing.assert_close(theta.detach(), forget * torch.tensor([1.0, -2.0, 3.0]))
    assert bool((theta.abs() < torch.tensor([1.0, 2.0, 3.0])).all())  # measured f ~ 0.99


# --- step() without a loss ------------------------------------------------------------------------

def test_rule_with_optional_loss_steps_without_one():
    meta = MetaLearnerLSTM(optional_loss=True)
    model, x, y = regression()
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    first = step(model, opt, x, y, with_loss=False)
    for _ in range(5):
        last = step(model, opt, x, y, with_loss=False)
    assert last < first
    # No loss input is a different input from any loss: the steps differ.
    other, _, _ = regression()
    other_opt = LSTMMetaOptimizer(other.parameters(), meta)
    step(other, other_opt, x, y)
    assert not torch.equal(other[0].weight, regression()[0][0].weight)


def test_rule_without_optional_loss_says_which_rules_accept_no_loss():
    model, x, y = regression()
    opt = LSTMMetaOptimizer(model.parameters(), MetaLearnerLSTM())
    with pytest.raises(ValueError, match=r"optional_loss=True.*'general'"):
        step(model, opt, x, y, with_loss=False)


# --- per-group lr and weight_decay -----------------------------------------------------------

def rule_and_options_step(lr, weight_decay, steps=4):
    """Parameters after ``steps`` with (lr, weight_decay), and what the formula predicts from
    the same state: theta + lr * (rule(theta) - theta) - lr * weight_decay * theta."""
    meta = MetaLearnerLSTM().double()
    model, x, y = regression(dtype=torch.float64)
    opt = LSTMMetaOptimizer(model.parameters(), meta, lr=lr, weight_decay=weight_decay)
    for _ in range(steps - 1):
        step(model, opt, x, y)
    probe, probe_opt = copy.deepcopy((model, opt))
    for group in probe_opt.param_groups:
        group.update(lr=1.0, weight_decay=0.0)
    before = weights(model)
    step(probe, probe_opt, x, y)
    step(model, opt, x, y)
    expected = [t + lr * (r - t) - lr * weight_decay * t
                for t, r in zip(before, probe.parameters())]
    return weights(model), expected


@pytest.mark.parametrize("lr, weight_decay", [(0.5, 0.0), (1.0, 0.01), (0.25, 0.1)])
def test_group_options_follow_the_documented_formula(lr, weight_decay):
    got, expected = rule_and_options_step(lr, weight_decay)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-14)


def test_default_options_are_bit_identical_to_the_rule():
    model, opt, x, y = trained(MetaLearnerLSTM())
    assert opt.param_groups[0]["lr"] == 1.0 and opt.param_groups[0]["weight_decay"] == 0.0
    other, other_opt, _, _ = trained(opt.meta_learner, lr=1.0, weight_decay=0.0)
    assert_same(model.parameters(), other.parameters())


@pytest.mark.parametrize("option, value", [("lr", -0.1), ("lr", math.inf),
                                           ("weight_decay", -1e-3), ("weight_decay", math.nan)])
def test_invalid_group_options_are_refused_naming_option_and_group(option, value):
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=rf"{option} of param group 0 must be finite"):
        LSTMMetaOptimizer(model.parameters(), **{option: value})
    opt = LSTMMetaOptimizer([{"params": [model.weight]}])
    with pytest.raises(ValueError, match=rf"{option} of param group 1 must be finite"):
        opt.add_param_group({"params": [model.bias], option: value})
    opt.param_groups[0][option] = value  # as a faulty scheduler would
    loss = model(torch.ones(1, 2)).sum()
    loss.backward()
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"{option} of param group 0"):
        opt.step(loss=loss)
    assert torch.equal(model.weight, before)


def scheduled_lrs(make_scheduler, steps=6, plateau=False):
    model, opt, x, y = trained(MetaLearnerLSTM(), steps=0)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        loss = step(model, opt, x, y)
        scheduler.step(loss) if plateau else scheduler.step()
    return lrs


def test_step_lr_and_cosine_annealing_set_the_multiplier():
    from torch.optim import lr_scheduler

    assert scheduled_lrs(lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5)) == [
        1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    cosine = scheduled_lrs(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4))
    expected = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(6)]
    assert cosine == pytest.approx(expected, abs=1e-12)


def test_one_cycle_lr_needs_cycle_momentum_off():
    from torch.optim import lr_scheduler

    lrs = scheduled_lrs(lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10,
                                                          cycle_momentum=False), steps=10)
    # Warm-up from max_lr / 25 to max_lr at step 0.3 * 10 - 1, then annealing towards 0.
    assert lrs[0] == pytest.approx(1.0 / 25) and lrs[2] == pytest.approx(1.0)
    assert lrs[-1] < 0.01
    with pytest.raises(ValueError, match="momentum"):
        scheduled_lrs(lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=6))


def test_reduce_lr_on_plateau_lowers_the_multiplier():
    from torch.optim import lr_scheduler

    model, opt, x, y = trained(MetaLearnerLSTM(), steps=0)
    scheduler = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    scheduler.step(1.0)
    scheduler.step(2.0)  # no improvement
    assert opt.param_groups[0]["lr"] == 0.5


def test_scheduled_lr_changes_the_update_exactly():
    from torch.optim import lr_scheduler

    meta = MetaLearnerLSTM().double()
    model, x, y = regression(dtype=torch.float64)
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    scheduler = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step(model, opt, x, y)
    scheduler.step()
    probe, probe_opt = copy.deepcopy((model, opt))
    probe_opt.param_groups[0]["lr"] = 1.0
    before = weights(model)
    step(probe, probe_opt, x, y)
    step(model, opt, x, y)
    for t, r, ours in zip(before, probe.parameters(), model.parameters()):
        torch.testing.assert_close(ours.detach(), t + 0.5 * (r.detach() - t), rtol=0, atol=1e-15)


def test_state_dict_keeps_lr_and_weight_decay():
    model, opt, _, _ = trained(MetaLearnerLSTM(), lr=0.3, weight_decay=0.02)
    opt.param_groups[0]["lr"] = 0.1
    other = LSTMMetaOptimizer(copy.deepcopy(model).parameters(), opt.meta_learner)
    other.load_state_dict(opt.state_dict())
    assert (other.param_groups[0]["lr"], other.param_groups[0]["weight_decay"]) == (0.1, 0.02)


def test_twin_agrees_with_the_drop_in_for_group_options():
    meta = MetaLearnerLSTM().double()
    model, x, y = regression(dtype=torch.float64)
    twin_model = copy.deepcopy(model)
    opt = LSTMMetaOptimizer(model.parameters(), meta, lr=0.5, weight_decay=0.01)
    for _ in range(5):
        step(model, opt, x, y)
    twin_opt = LSTMMetaOptimizer(twin_model.parameters(), meta, lr=0.5, weight_decay=0.01)
    with higher.innerloop_ctx(twin_model, twin_opt, copy_initial_weights=False) as (fmodel,
                                                                                    diffopt):
        for _ in range(5):
            diffopt.step(F.mse_loss(fmodel(x), y))
        fast = list(fmodel.parameters())
        query = F.mse_loss(fmodel(x), y)
    for ours, theirs in zip(model.parameters(), fast):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-12)
    query.backward()  # the options are on the tape: meta-gradients still reach the rule
    assert meta.meta_bias.grad is not None and bool(meta.meta_bias.grad.abs().sum() > 0)


def test_twin_lr_override_is_differentiable():
    meta = MetaLearnerLSTM().double()
    model, x, y = regression(dtype=torch.float64)
    lr = torch.tensor(0.5, requires_grad=True)  # float32 with float64 parameters: cast
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(x), y).backward()
    assert lr.grad is not None and lr.grad.item() != 0.0


def test_twin_keeps_the_first_order_chain_only_for_default_options():
    meta = MetaLearnerLSTM()
    chains = {}
    for lr in (1.0, 0.5):
        model, x, y = regression()
        opt = LSTMMetaOptimizer(model.parameters(), meta, lr=lr)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(x), y))
            chains[lr] = sum(len(c) for c in diffopt._chains)
    assert chains == {1.0: 1, 0.5: 0}
