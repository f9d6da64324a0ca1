"""SinusoidTasks: parameter ranges of both protocols, the formula, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from learned_optim.data import SinusoidTasks


def _parameters(tasks: SinusoidTasks, count: int) -> torch.Tensor:
    return torch.tensor([list(tasks.task_parameters(i)) for i in range(count)])


def test_maml_parameters_fill_their_ranges():
    params = _parameters(SinusoidTasks(shots=5), 1000)
    amplitude, phase, frequency = params.T
    assert 0.1 <= amplitude.min() < 0.2 and 4.9 < amplitude.max() <= 5.0
    assert 0.0 <= phase.min() < 0.05 and math.pi - 0.05 < phase.max() <= math.pi
    assert amplitude.mean().item() == pytest.approx(2.55, abs=0.15)  # mean of U[0.1, 5]
    assert torch.all(frequency == 1.0)


def test_metasgd_frequency_fills_0_8_to_1_2():
    frequency = _parameters(SinusoidTasks(shots=5, protocol="metasgd"), 1000)[:, 2]
    assert 0.8 <= frequency.min() < 0.81 and 1.19 < frequency.max() <= 1.2


def test_inputs_fill_minus_5_to_5():
    tasks = SinusoidTasks(shots=10, queries=10)
    x = torch.cat(
        [torch.cat([e.support_inputs, e.query_inputs]) for e in tasks.episodes(count=100)]
    )
    assert -5.0 <= x.min() < -4.9 and 4.9 < x.max() <= 5.0
    assert x.mean().item() == pytest.approx(0.0, abs=0.2)


def test_maml_targets_are_a_sin_x_minus_b():
    tasks = SinusoidTasks(shots=5)
    for index in (0, 17):
        episode, task = tasks.episode(index), tasks.task_parameters(index)
        x = torch.cat([episode.support_inputs, episode.query_inputs]).double()
        y = torch.cat([episode.support_targets, episode.query_targets]).double()
        torch.testing.assert_close(y, task.amplitude * torch.sin(x - task.phase), atol=1e-6, rtol=0)


def test_metasgd_targets_are_a_sin_w_x_plus_b():
    tasks = SinusoidTasks(shots=5, queries=100, protocol="metasgd")
    episode, task = tasks.episode(3), tasks.task_parameters(3)
    expected = task.amplitude * torch.sin(
        task.frequency * episode.query_inputs.double() + task.phase
    )
    torch.testing.assert_close(episode.query_targets.double(), expected, atol=1e-6, rtol=0)


def test_shapes_dtypes_and_default_queries():
    episode = SinusoidTasks(shots=5).episode(0)
    assert [tuple(t.shape) for t in episode] == [(5, 1)] * 4
    assert {t.dtype for t in episode} == {torch.float32}
    assert SinusoidTasks(shots=5, queries=100).episode(0).query_inputs.shape == (100, 1)


def test_same_seed_and_index_give_the_same_task_and_points():
    first, again = SinusoidTasks(shots=5, seed=7).episode(42), SinusoidTasks(5, seed=7).episode(42)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert SinusoidTasks(5, seed=8).task_parameters(42) != SinusoidTasks(5, seed=7).task_parameters(
        42
    )


def test_protocols_share_amplitude_and_phase_for_the_same_index():
    maml, metasgd = SinusoidTasks(5), SinusoidTasks(5, protocol="metasgd")
    assert maml.task_parameters(9)[:2] == metasgd.task_parameters(9)[:2]


def test_unknown_protocol_and_bad_shots_raise():
    with pytest.raises(ValueError, match="protocol must be one of"):
        SinusoidTasks(shots=5, protocol="reptile")
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        SinusoidTasks(shots=0)
