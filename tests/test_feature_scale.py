"""The conv learner's cosine head (``feature_scale``): features scaled to one length before the
head, no new parameter, carried by the configuration into every place that rebuilds the
learner (meta-training, evaluation, the few-shot classifier)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learned_optim import FewShotClassifier, load_checkpoint
from learned_optim.checkpoint import save_checkpoint
from learned_optim.config import MetaTrainConfig
from learned_optim.data import omniglot
from learned_optim.learners import ConvLearner, ScaledUnitNorm
from learned_optim.tasks import build_task

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def test_features_come_out_at_the_given_length():
    torch.manual_seed(0)
    learner = ConvLearner(1, ways=5, filters=8, image_size=28, feature_scale=7.5)
    features = learner.features(torch.rand(6, 1, 28, 28))
    assert torch.allclose(features.norm(dim=1), torch.full((6,), 7.5))
    assert learner(torch.rand(6, 1, 28, 28)).shape == (6, 5)


def test_the_cosine_head_adds_no_parameter():
    plain = ConvLearner(1, ways=5, filters=8, image_size=28)
    cosine = ConvLearner(1, ways=5, filters=8, image_size=28, feature_scale=10.0)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in cosine.state_dict().items()}
    cosine.load_state_dict(plain.state_dict())  # checkpoints load either way


@pytest.mark.parametrize("fields", [{"task": "omniglot", "feature_scale": 0.0},
                                    {"task": "omniglot", "feature_scale": -2.0},
                                    {"task": "sinusoid", "feature_scale": 5.0}])
def test_a_bad_scale_or_a_learner_without_features_is_refused(fields):
    with pytest.raises(ValueError, match=r"feature_scale \(--feature-scale\)"):
        MetaTrainConfig(**fields)


def test_the_task_builds_its_learner_with_the_scale():
    config = MetaTrainConfig(task="omniglot", protocol="lake", data_root=str(ROOT),
                             feature_scale=12.0)
    learner = build_task(config).make_learner()
    assert isinstance(learner.features[-1], ScaledUnitNorm)
    assert learner.features[-1].scale == 12.0
    assert not any(isinstance(m, ScaledUnitNorm)
                   for m in build_task(MetaTrainConfig(task="omniglot")).make_learner().modules())


def test_the_classifier_rebuilds_the_cosine_head_from_the_record(tmp_path):
    shipped = load_checkpoint("omniglot-lake-5w1s")
    record = shipped.record
    scaled = tmp_path / "scaled.safetensors"
    save_checkpoint(scaled, shipped.meta_learner, learned_init=shipped.learned_init,
                    config={**record["config"], "feature_scale": 25.0},
                    preprocessing=record["preprocessing"], training_data=record["training_data"])
    data = omniglot(ROOT, "val", "lake")
    # as the files hold them: dark strokes on white (the preprocessing inverts)
    support = 1 - data.inputs[[20 * c for c in range(5)]]  # one drawing of 5 characters
    queries = 1 - data.inputs[[20 * c + 1 for c in range(5)]]
    plain_clf = FewShotClassifier.from_pretrained("omniglot-lake-5w1s").fit(support, list("abcde"))
    scaled_clf = FewShotClassifier.from_pretrained(scaled).fit(support, list("abcde"))
    plain, cosine = plain_clf.predict_proba(queries), scaled_clf.predict_proba(queries)
    assert plain.shape == cosine.shape == (5, 5)
    assert abs(plain - cosine).max() > 1e-3  # the scale is applied, not ignored
