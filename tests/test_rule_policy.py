"""learned_optim.rule.policy: every chunk and replay size, per device, in one place."""

import torch

from learned_optim.rule import policy

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cpu_chunks_are_cache_sized_and_accelerator_chunks_large():
    for rows in (policy.forward_chunk_rows, policy.backward_chunk_rows, policy.step_chunk_rows):
        assert rows(CPU) == 8192
        assert rows(CUDA) == policy.ACCELERATOR_CHUNK_ROWS == 2**18
    assert policy.replay_chunk_bytes(CPU) == 24 * 2**20
    assert policy.replay_chunk_bytes(CUDA) == 2**30


def test_replay_chunks_fit_the_budget_within_bounds(monkeypatch):
    assert policy.replay_chunk_rows(CPU, 10**6, 12, 900) == 24 * 2**20 // (12 * 900)
    assert policy.replay_chunk_rows(CPU, 100, 12, 900) == 100  # never more than the rows
    monkeypatch.setattr(policy, "REPLAY_CHUNK_BYTES", 1)
    assert policy.replay_chunk_rows(CPU, 10**6, 12, 900) == policy.MIN_REPLAY_CHUNK_ROWS


def test_the_sizes_are_read_at_call_time(monkeypatch):
    monkeypatch.setattr(policy, "FORWARD_CHUNK_ROWS", 16)
    assert policy.forward_chunk_rows(CPU) == 16
