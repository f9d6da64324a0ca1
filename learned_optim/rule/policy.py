"""Every chunk and replay size of the update rule, per device: the one place that sets them.

The kernels of :mod:`learned_optim.rule.math` take any number of rows; how many they take at
once is a trade of memory for speed that differs by device. On a CPU, chunks are sized to keep
their temporaries in the last-level cache; on an accelerator, where a call costs the launches
of its kernels more than their work, chunks are as large as a memory bound allows.

The functions read the constants at call time, so a test or a benchmark may set a constant of
this module (``policy.REPLAY_CHUNK_BYTES = ...``) to choose another point of the trade.
"""

from __future__ import annotations

import torch

__all__ = [
    "FORWARD_CHUNK_ROWS",
    "BACKWARD_CHUNK_ROWS",
    "STEP_CHUNK_ROWS",
    "ACCELERATOR_CHUNK_ROWS",
    "REPLAY_CHUNK_BYTES",
    "ACCELERATOR_REPLAY_CHUNK_BYTES",
    "MIN_REPLAY_CHUNK_ROWS",
    "SEGMENT_STEPS",
    "backward_chunk_rows",
    "forward_chunk_rows",
    "replay_chunk_bytes",
    "replay_chunk_rows",
    "step_chunk_rows",
]

# Rows per call of the chunked forward: its scratch (182 floats a row at H = 20) stays in cache.
FORWARD_CHUNK_ROWS = 8192
# Rows recomputed at once in the per-step backward: bounds its temporaries (about 1.5 KB a row
# at H = 20, so 12 MB) whatever the learner's size, and keeps them in cache.
BACKWARD_CHUNK_ROWS = 8192
# Rows of a bucket that the in-place optimizer updates at once (its ``chunk_size`` default on
# the CPU). Measured on 2 cores at 1M parameters, 8192 was the fastest of 2048 .. 65536
# (smaller chunks pay per-call overhead, larger ones fall out of cache).
STEP_CHUNK_ROWS = 8192
# Rows per call on an accelerator, where cache-sized chunks only multiply launches: 2**18 rows
# bound one call's scratch to about 190 MB at H = 20 (the per-step backward's temporaries to
# about 390 MB).
ACCELERATOR_CHUNK_ROWS = 2**18

# Per-chunk memory of the first-order replay (every step's state, parameter and intermediates,
# about 900 bytes a row and step at H = 20): 24 MB is about 2,200 rows at T = 12, cache-sized.
REPLAY_CHUNK_BYTES = 24 * 2**20
# On a GPU the replay is bound by kernel launches, not by cache: every chunk launches every
# step's kernels again, so the chunks are as large as this memory allows (one chunk for the
# paper's learner: about 310 MB at T = 12).
ACCELERATOR_REPLAY_CHUNK_BYTES = 2**30
# However long the trajectory, a replay chunk takes at least this many rows.
MIN_REPLAY_CHUNK_ROWS = 256
# Steps recorded against one anchor of a first-order trajectory: bounds the replay's per-chunk
# memory and the cost of a gradient that reaches an intermediate step.
SEGMENT_STEPS = 32


def _on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def forward_chunk_rows(device: torch.device) -> int:
    """Rows per call of the chunked forward (the tape's nodes run their forward with it).

    >>> forward_chunk_rows(torch.device("cpu")), forward_chunk_rows(torch.device("cuda"))
    (8192, 262144)
    """
    return FORWARD_CHUNK_ROWS if _on_cpu(device) else ACCELERATOR_CHUNK_ROWS


def backward_chunk_rows(device: torch.device) -> int:
    """Rows recomputed at once by the per-step node's backward.

    >>> backward_chunk_rows(torch.device("cpu")), backward_chunk_rows(torch.device("cuda"))
    (8192, 262144)
    """
    return BACKWARD_CHUNK_ROWS if _on_cpu(device) else ACCELERATOR_CHUNK_ROWS


def step_chunk_rows(device: torch.device) -> int:
    """Rows the in-place optimizer updates at once when it is given no ``chunk_size``.

    >>> step_chunk_rows(torch.device("cpu")), step_chunk_rows(torch.device("cuda"))
    (8192, 262144)
    """
    return STEP_CHUNK_ROWS if _on_cpu(device) else ACCELERATOR_CHUNK_ROWS


def replay_chunk_bytes(device: torch.device) -> int:
    """Memory one chunk of the first-order replay may take on ``device``.

    >>> replay_chunk_bytes(torch.device("cpu")) // 2**20, replay_chunk_bytes(torch.device("cuda"))
    (24, 1073741824)
    """
    return REPLAY_CHUNK_BYTES if _on_cpu(device) else ACCELERATOR_REPLAY_CHUNK_BYTES


def replay_chunk_rows(device: torch.device, rows: int, steps: int, bytes_per_row_step: int) -> int:
    """Rows replayed at once: as many as :func:`replay_chunk_bytes` holds for ``steps`` steps
    of ``bytes_per_row_step`` each, at least ``MIN_REPLAY_CHUNK_ROWS``, at most ``rows``.

    >>> replay_chunk_rows(torch.device("cpu"), 10**6, 12, 900)
    2330
    >>> replay_chunk_rows(torch.device("cpu"), 100, 12, 900)
    100
    """
    budget = replay_chunk_bytes(device)
    return min(rows, max(MIN_REPLAY_CHUNK_ROWS, budget // (bytes_per_row_step * steps)))
