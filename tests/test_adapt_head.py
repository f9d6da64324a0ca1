"""Adapting the head alone (``adapt = "head"``): the drop-in path, the ``higher`` twin, their
agreement, meta-training into a checkpoint the classifier follows, and the refusals; all on
real Omniglot episodes and the shipped rule."""

import copy
import warnings

import higher
import pytest
import torch
from torch.nn import functional as F

from learned_optim import FewShotClassifier, load_checkpoint
from learned_optim.baselines import MetaSGDRates
from learned_optim.config import MetaTrainConfig
from learned_optim.finetune import adapted_parameters, finetune
from learned_optim.learners import ConvLearner, reset_batchnorm
from learned_optim.tasks import build_task
from learned_optim.train import MetaTrainer, inner_optimizer, meta_train


@pytest.fixture(scope="module")
def lake(shared_data):
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=5, shots=1,
                             queries=3, inner_steps=4, filters=8, feature_scale=10.0,
                             data_root=str(shared_data / "omniglot")).resolved()
    return build_task(config)


@pytest.fixture(scope="module")
def rule():
    return load_checkpoint("omniglot-lake-20w1s").meta_learner


def test_finetune_moves_the_head_only_and_builds_no_graph_through_the_features(lake, rule):
    torch.manual_seed(0)
    episode = lake.episodes("val").episode(0)
    learner = lake.make_learner()
    before = F.cross_entropy(learner(episode.support_inputs), episode.support_targets).item()
    graphs = []  # whether the features' output is on the autograd tape, call by call
    learner.features.register_forward_hook(lambda m, i, out: graphs.append(out.requires_grad))
    adapted = finetune(learner, episode.support_inputs, episode.support_targets,
                       optimizer=rule, steps=4, adapt="head")
    assert graphs == [False] * 4  # nothing of the features is recorded for a backward pass
    for (name, ours), (_, theirs) in zip(adapted.named_parameters(), learner.named_parameters()):
        assert torch.equal(ours, theirs) != name.startswith("head."), name
        assert ours.requires_grad  # the copy's flags as the model's
    scored = copy.deepcopy(adapted).train()  # the support loss under its own statistics
    with torch.no_grad():
        after = F.cross_entropy(scored(episode.support_inputs), episode.support_targets).item()
    assert after < before * 0.8, (before, after)
    # the same as freezing the features by hand (the session-21 screen's way)
    frozen = lake.make_learner()
    frozen.load_state_dict(learner.state_dict())
    for param in frozen.features.parameters():
        param.requires_grad_(False)
    by_hand = finetune(frozen, episode.support_inputs, episode.support_targets, optimizer=rule,
                       steps=4)
    with torch.no_grad():
        assert torch.equal(adapted(episode.query_inputs), by_hand(episode.query_inputs))
    graphs.clear()
    finetune(learner, episode.support_inputs, episode.support_targets, optimizer=rule, steps=1)
    assert graphs == [True]  # adapting everything does


def test_an_unknown_part_is_refused_naming_the_model_s_submodules(lake, rule):
    learner = lake.make_learner()
    with pytest.raises(ValueError, match=r"adapt='fc': ConvLearner has no submodule 'fc' "
                                         r"\(its submodules: \['features', 'head'\]\)"):
        finetune(learner, torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long),
                 optimizer=rule, steps=1, adapt="fc")
    for param in learner.head.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="ConvLearner.head has no parameter that requires grad"):
        adapted_parameters(learner, "head")


def test_the_higher_twin_adapts_the_head_agrees_with_the_drop_in_and_meta_learns_the_features(
        lake, rule):
    torch.manual_seed(1)
    config = MetaTrainConfig(**{**lake.config.to_dict(), "adapt": "head"}).resolved()
    episode = lake.episodes("train").episode(3)
    learner = lake.make_learner()
    opt, kwargs = inner_optimizer(config, rule, learner)
    assert [p for group in opt.param_groups for p in group["params"]] == list(
        learner.head.parameters())
    reset_batchnorm(learner)
    expected = finetune(learner, episode.support_inputs, episode.support_targets,
                        optimizer=rule, steps=4, adapt="head")
    with higher.innerloop_ctx(learner, opt, copy_initial_weights=False) as (fmodel, diffopt):
        fmodel.train()
        for _ in range(4):
            diffopt.step(F.cross_entropy(fmodel(episode.support_inputs),
                                         episode.support_targets), **kwargs)
        fast = dict(zip([n for n, _ in learner.named_parameters()], fmodel.fast_params))
        for name, param in learner.named_parameters():  # the features stay the init
            assert torch.equal(fast[name], param) != name.startswith("head."), name
        fmodel.eval()
        query_loss = F.cross_entropy(fmodel(episode.query_inputs), episode.query_targets)
        with torch.no_grad():
            assert torch.allclose(fmodel(episode.query_inputs),
                                  expected(episode.query_inputs), atol=1e-5)
        query_loss.backward()
    # the outer loop still reaches the features' init and the rule's weights
    assert learner.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in rule.parameters())
    for param in rule.parameters():
        param.grad = None


def test_meta_trains_and_the_checkpoint_s_classifier_adapts_the_head_alone(shared_data,
                                                                           tmp_path):
    torch.set_num_threads(1)
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=5, shots=1,
                             queries=2, inner_steps=2, filters=4, adapt="head", meta_steps=2,
                             meta_batch=1, val_episodes=2, validate_every=2, checkpoint_every=2,
                             data_root=str(shared_data / "omniglot"),
                             run_dir=str(tmp_path / "run"))
    trainer = MetaTrainer(config, progress=False)
    init = {name: p.detach().clone() for name, p in trainer.learner.named_parameters()}
    trainer.meta_step()
    moved = [name for name, p in trainer.learner.named_parameters()
             if not torch.equal(p, init[name])]
    assert "features.0.weight" in moved and "head.weight" in moved  # the outer loop moves both
    checkpoint = load_checkpoint(meta_train(config, progress=False))
    assert checkpoint.record["config"]["adapt"] == "head"

    episode = build_task(config.resolved()).episodes("val").episode(0)
    clf = FewShotClassifier(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf.fit(list(1 - episode.support_inputs), episode.support_targets.tolist())
    for name, param in clf._model.named_parameters():
        assert torch.equal(param, checkpoint.learned_init[name]) != name.startswith("head."), name


def test_head_only_meta_sgd_and_maml_build_their_inner_optimizers(lake):
    for method in ("maml", "metasgd"):
        config = MetaTrainConfig(**{**lake.config.to_dict(), "adapt": "head", "method": method,
                                    "inner_lr": 0.1}).resolved()
        learner = lake.make_learner()
        rates = MetaSGDRates(learner, initial=0.1) if method == "metasgd" else None
        opt, kwargs = inner_optimizer(config, rates, learner)
        params = [p for group in opt.param_groups for p in group["params"]]
        assert params == list(learner.head.parameters())
        if method == "metasgd":
            assert [r.shape for r in kwargs["override"]["lr"]] == [p.shape for p in params]


def test_the_option_is_checked_and_old_records_adapt_everything():
    assert MetaTrainConfig(task="omniglot").adapt == "all"
    with pytest.raises(ValueError, match=r"adapt must be one of \('all', 'head'\), got 'body'"):
        MetaTrainConfig(task="omniglot", adapt="body")
    with pytest.raises(ValueError, match="adapt 'head' is for the image tasks.*'sinusoid'"):
        MetaTrainConfig(task="sinusoid", adapt="head")
    old = MetaTrainConfig(task="omniglot").to_dict()
    del old["adapt"]
    assert MetaTrainConfig.from_dict(old).adapt == "all"


def test_a_warm_start_from_another_architecture_takes_the_rule_alone(shared_data, tmp_path):
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=5, shots=1,
                             queries=2, inner_steps=2, filters=4, architecture="resnet12",
                             meta_steps=1, meta_batch=1,
                             init_from="omniglot-lake-20w1s",
                             data_root=str(shared_data / "omniglot"),
                             run_dir=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match="only its update rule is loaded; its learned init is "
                                         "a 'conv4' learner's, this run's is 'resnet12' \\(and "
                                         "nothing pre-trains it"):
        trainer = MetaTrainer(config, progress=False)
    shipped = load_checkpoint("omniglot-lake-20w1s").meta_learner
    for ours, theirs in zip(trainer.rule.parameters(), shipped.parameters()):
        assert torch.equal(ours, theirs)
    assert not isinstance(trainer.learner, ConvLearner)
