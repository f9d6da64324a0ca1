"""Lake et al.'s within-alphabet episodes on the real Omniglot evaluation alphabets."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from learned_optim.config import MetaTrainConfig
from learned_optim.data import FewShotDataset, WithinAlphabetSampler, omniglot
from learned_optim.data.preprocessing import Preprocessing, preprocess
from learned_optim.tasks import build_task


@pytest.fixture(scope="module")
def evaluation_alphabets(omniglot_root, omniglot_cache):
    return omniglot(omniglot_root, "test", "lake-within", cache_dir=omniglot_cache)


def _alphabet(dataset, c):
    return dataset.class_names[c].split("/")[0]


def test_every_20_way_episode_uses_one_of_the_20_evaluation_alphabets(evaluation_alphabets):
    sampler = WithinAlphabetSampler(evaluation_alphabets, ways=20, shots=1, queries=1, seed=0)
    assert len(sampler.alphabets) == 20  # every evaluation alphabet has >= 20 characters
    used = set()
    for index in range(200):
        classes, _, _ = sampler.episode_indices(index)
        alphabets = {_alphabet(evaluation_alphabets, int(c)) for c in classes}
        assert len(alphabets) == 1 and len(set(classes.tolist())) == 20
        used |= alphabets
    assert len(used) == 20  # 200 episodes reach all of them


def test_support_and_query_are_drawn_by_disjoint_drawers(evaluation_alphabets):
    sampler = WithinAlphabetSampler(evaluation_alphabets, ways=5, shots=2, queries=15, seed=3)
    # drawer of every example = its rank in its class (files sorted IIII_DD.png)
    rank = torch.empty(len(evaluation_alphabets), dtype=torch.int64)
    for c in range(evaluation_alphabets.num_classes):
        rank[evaluation_alphabets.indices_of(c)] = torch.arange(20)
    for index in range(50):
        _, support, query = sampler.episode_indices(index)
        support_drawers, query_drawers = sampler.episode_drawers(index)
        assert set(rank[support].tolist()) == set(support_drawers.tolist())
        assert set(rank[query].tolist()) == set(query_drawers.tolist())
        assert len(set(support_drawers.tolist())) == 2 and len(set(query_drawers.tolist())) == 15
        assert set(support_drawers.tolist()).isdisjoint(query_drawers.tolist())
        episode = sampler.episode(index)
        assert episode.support_targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_rank_in_class_is_the_drawer_of_the_official_file(omniglot_root, evaluation_alphabets):
    # The sampler's default drawer ids are ranks: check them against IIII_DD.png on the zip.
    c = evaluation_alphabets.class_names.index("Kannada/character25")
    with zipfile.ZipFile(omniglot_root / "images_evaluation.zip") as archive:
        for drawer in (1, 7, 20):
            name = f"images_evaluation/Kannada/character25/1229_{drawer:02d}.png"
            image = Image.open(io.BytesIO(archive.read(name)))
            expected = preprocess(image, Preprocessing.omniglot(28))[0]
            assert torch.equal(evaluation_alphabets.examples_of(c)[drawer - 1], expected)


def test_episodes_depend_only_on_seed_and_index(evaluation_alphabets):
    a = WithinAlphabetSampler(evaluation_alphabets, ways=20, shots=1, queries=1, seed=5)
    b = WithinAlphabetSampler(evaluation_alphabets, ways=20, shots=1, queries=1, seed=5)
    assert torch.equal(a.episode(9).query_inputs, b.episode(9).query_inputs)
    assert not torch.equal(a.episode(9).query_inputs, a.episode(10).query_inputs)


def test_refuses_more_ways_than_any_alphabet_has():
    names = [f"{a}/character{c:02d}" for a in "AB" for c in range(1, 4)]
    data = FewShotDataset(torch.rand(24, 1, 2, 2), torch.arange(6).repeat_interleave(4), names)
    with pytest.raises(ValueError, match="ways=4 exceeds the classes of every alphabet"):
        WithinAlphabetSampler(data, ways=4, shots=1, queries=1)
    two_drawers = torch.tensor([0, 0, 1, 1]).repeat(6)  # 4 examples per class, 2 drawers
    with pytest.raises(ValueError, match="exceeds the 2 drawers"):
        WithinAlphabetSampler(data, ways=3, shots=1, queries=2, drawers=two_drawers)


def test_refuses_a_class_missing_a_drawer():
    names = ["A/character01", "A/character02"]
    data = FewShotDataset(torch.rand(5, 1, 2, 2), torch.tensor([0, 0, 0, 1, 1]), names)
    with pytest.raises(ValueError, match="has no example by drawer 2"):
        WithinAlphabetSampler(data, ways=2, shots=1, queries=1,
                              drawers=torch.tensor([0, 1, 2, 0, 1]))


def test_lake_within_task_tests_on_evaluation_alphabets_and_validates_on_background(
        omniglot_root, omniglot_cache, monkeypatch):
    monkeypatch.setenv("LEARNED_OPTIM_CACHE", str(omniglot_cache))
    task = build_task(MetaTrainConfig(task="omniglot", protocol="lake-within", ways=20,
                                      data_root=str(omniglot_root)))
    test, val, train = task.episodes("test"), task.episodes("val"), task.episodes("train")
    assert isinstance(test, WithinAlphabetSampler) and len(test.alphabets) == 20
    assert len(val.alphabets) == 1  # 96 characters spread over 30 alphabets: one group
    names = set(test.dataset.class_names)
    assert names.isdisjoint(train.dataset.class_names) and names.isdisjoint(
        val.dataset.class_names)
    assert len(np.unique([n.split("/")[0] for n in train.dataset.class_names])) == 30


def test_refuses_two_examples_of_a_class_by_one_drawer():
    names = ["A/character01", "A/character02"]
    data = FewShotDataset(torch.rand(6, 1, 2, 2), torch.tensor([0, 0, 0, 1, 1, 1]), names)
    with pytest.raises(ValueError, match="two examples of one class by one drawer"):
        WithinAlphabetSampler(data, ways=2, shots=1, queries=1,
                              drawers=torch.tensor([0, 1, 1, 0, 1, 2]))
