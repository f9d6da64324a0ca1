"""ResNet-12 as the image learner (``architecture = "resnet12"``): its shape, its choice by
configuration, and its meta-training, checkpoint and classifier on real Omniglot."""

import warnings

import pytest
import torch

from learned_optim import FewShotClassifier, load_checkpoint
from learned_optim.config import ARCHITECTURES, MetaTrainConfig
from learned_optim.finetune import finetune
from learned_optim.learners import (
    LEARNER_CLASSES,
    ConvLearner,
    ResNet12Learner,
    classification_learner,
)
from learned_optim.tasks import build_task
from learned_optim.train import MetaTrainer


def test_four_stages_double_the_width_and_pool_to_eight_filters_features():
    learner = ResNet12Learner(in_channels=1, ways=7, filters=4, image_size=28)
    widths = [stage.body[0].out_channels for stage in learner.features[:4]]
    assert widths == [4, 8, 16, 32]
    assert learner.features(torch.rand(3, 1, 28, 28)).shape == (3, 32)
    assert learner(torch.rand(3, 1, 84, 84)).shape == (3, 7)  # any size: global pooling
    scaled = ResNet12Learner(1, 7, 4, 28, feature_scale=5.0)
    lengths = scaled.features(torch.rand(3, 1, 28, 28)).norm(dim=1)
    assert torch.allclose(lengths, torch.full((3,), 5.0))
    with pytest.raises(ValueError, match="image_size 8 is too small"):
        ResNet12Learner(1, 5, 4, 8)


def test_the_configuration_chooses_the_learner_and_refuses_unknown_ones(shared_data):
    assert MetaTrainConfig(task="omniglot").architecture == "conv4"
    assert tuple(LEARNER_CLASSES) == ARCHITECTURES  # every name the config takes builds
    with pytest.raises(ValueError, match="architecture must be one of .*'resnet'"):
        MetaTrainConfig(task="omniglot", architecture="resnet")
    with pytest.raises(ValueError, match="architecture must be one of"):
        classification_learner("vgg", 1, 5, 4, 28, 0.9)
    for task in ("sinusoid", "general"):  # their learners are not the image learner
        with pytest.raises(ValueError, match=f"'resnet12' is for the image tasks.*'{task}'"):
            MetaTrainConfig(task=task, architecture="resnet12")
    # records written before the option have no such field: the paper's learner
    old = MetaTrainConfig(task="omniglot").to_dict()
    del old["architecture"]
    assert MetaTrainConfig.from_dict(old).architecture == "conv4"
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=5, filters=4,
                             data_root=str(shared_data / "omniglot"))
    assert isinstance(build_task(config.resolved()).make_learner(), ConvLearner)
    task = build_task(MetaTrainConfig(**{**config.to_dict(), "architecture": "resnet12"})
                      .resolved())
    assert isinstance(task.make_learner(), ResNet12Learner)


def test_fits_a_real_support_set_under_the_papers_batchnorm_protocol(shared_data):
    torch.manual_seed(0)
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=5, shots=1,
                             filters=8, architecture="resnet12",
                             data_root=str(shared_data / "omniglot")).resolved()
    task = build_task(config)
    episode = task.episodes("train").episode(0)
    learner = task.make_learner()
    before = torch.nn.functional.cross_entropy(learner(episode.support_inputs),
                                               episode.support_targets).item()
    adapted = finetune(learner, episode.support_inputs, episode.support_targets,
                       optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
                       steps=20)
    with torch.no_grad():
        logits = adapted(episode.support_inputs)
    after = torch.nn.functional.cross_entropy(logits, episode.support_targets).item()
    assert (logits.argmax(1) == episode.support_targets).all()
    assert after < before / 4, (before, after)
    # eval mode with the support steps' statistics: queries do not change each other's scores
    with torch.no_grad():
        one = adapted(episode.query_inputs[:1])
        many = adapted(episode.query_inputs)[:1]
    assert torch.allclose(one, many, atol=1e-5)


def test_meta_trains_into_a_checkpoint_the_classifier_rebuilds(shared_data, tmp_path):
    torch.set_num_threads(1)
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=5, shots=1,
                             queries=2, inner_steps=2, filters=4, architecture="resnet12",
                             feature_scale=10.0, meta_steps=2, meta_batch=1, val_episodes=2,
                             validate_every=2, checkpoint_every=2,
                             data_root=str(shared_data / "omniglot"),
                             run_dir=str(tmp_path / "run"))
    trainer = MetaTrainer(config, progress=False)
    assert isinstance(trainer.learner, ResNet12Learner)
    init = {name: p.detach().clone() for name, p in trainer.learner.named_parameters()}
    best = trainer.run()
    # The outer loop moved the init (the best checkpoint may still be the step-0 one: its two
    # validation episodes can tie on another CPU's arithmetic).
    assert any(not torch.equal(p, init[name]) for name, p in trainer.learner.named_parameters())
    checkpoint = load_checkpoint(best)
    assert checkpoint.record["config"]["architecture"] == "resnet12"
    assert set(checkpoint.learned_init) == set(init)

    episode = build_task(config.resolved()).episodes("val").episode(0)
    clf = FewShotClassifier(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dark ink on white, as image files come
        clf.fit(list(1 - episode.support_inputs), episode.support_targets.tolist())
    assert isinstance(clf._model, ResNet12Learner)
    probabilities = clf.predict_proba(list(1 - episode.query_inputs))
    assert probabilities.shape == (len(episode.query_inputs), 5)
    assert abs(probabilities.sum(1) - 1).max() < 1e-5
