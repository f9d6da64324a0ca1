"""Every chunk and replay size of the update rule, per device: the one place that sets them.

The kernels of :mod:`learned_optim.rule.math` take any number of rows; how many they take at
once is a trade of memory for speed that differs by device. On a CPU, chunks are sized to keep
their temporaries in the last-level cache; on an accelerator, where a call costs the launches
of its kernels more than their work, chunks are as large as a memory bound allows.

The functions read the constants at call time, so a test or a benchmark may set a constant of
this module (``policy.REPLAY_CHUNK_BYTES = ...``) to choose another point of the trade.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = [
    "FORWARD_CHUNK_ROWS",
    "BACKWARD_CHUNK_ROWS",
    "STEP_CHUNK_ROWS",
    "ACCELERATOR_CHUNK_ROWS",
    "REPLAY_CHUNK_BYTES",
    "ACCELERATOR_REPLAY_CHUNK_BYTES",
    "COMPILE_RULE",
    "COMPILED_MAX_ROWS",
    "COMPILED_MIN_ROWS",
    "MIN_REPLAY_CHUNK_ROWS",
    "SEGMENT_STEPS",
    "PARALLEL_MIN_ROWS",
    "RECORDED_MAX_ROWS",
    "TAPE_PATHS",
    "backward_chunk_rows",
    "busy_cores",
    "chunk_loop_threads",
    "forward_chunk_rows",
    "in_compiled_range",
    "meta_step_threads",
    "replay_chunk_bytes",
    "replay_chunk_rows",
    "step_chunk_rows",
    "tape_path",
    "step_compiles",
    "step_native",
    "step_triton",
    "trajectory_triton",
    "step_threads",
    "tape_step_threads",
    "threads_for_chunk_loop",
    "threads_for_meta_step",
    "threads_for_step",
    "threads_for_tape_step",
    "usable_cores",
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
# about 900 bytes a row and step at H = 20): 48 MB is about 4,660 rows at T = 12. The replay
# runs its kernels feature-major (contiguous gate slabs), so each call's fixed cost of about
# 60 operator dispatches weighs more than the cache: one thread at 28,485 rows, T = 12, the
# replay took 0.89-0.96x the time with 48 MB as with 24 MB (5 interleaved runs; 64 MB about as
# 48, 96 MB no better). With the row-major kernels 24 MB was best (docs/results/cpu_paths.md).
REPLAY_CHUNK_BYTES = 48 * 2**20
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
    (48, 1073741824)
    """
    return REPLAY_CHUNK_BYTES if _on_cpu(device) else ACCELERATOR_REPLAY_CHUNK_BYTES


def replay_chunk_rows(device: torch.device, rows: int, steps: int, bytes_per_row_step: int) -> int:
    """Rows replayed at once: as many as :func:`replay_chunk_bytes` holds for ``steps`` steps
    of ``bytes_per_row_step`` each, at least ``MIN_REPLAY_CHUNK_ROWS``, at most ``rows``.

    >>> replay_chunk_rows(torch.device("cpu"), 10**6, 12, 900)
    4660
    >>> replay_chunk_rows(torch.device("cpu"), 100, 12, 900)
    100
    """
    budget = replay_chunk_bytes(device)
    return min(rows, max(MIN_REPLAY_CHUNK_ROWS, budget // (bytes_per_row_step * steps)))


# Threads of the CPU chunk loops (the in-place step, the tape's forward, backward and replay).
# A chunk runs about 25 kernels, each one OpenMP parallel region whose threads all wait for the
# slowest: on the shared 2-core EPYC (load average about 5), a 55k-parameter step took 1,572 ms
# with 2 threads and 46 ms with one (docs/results/step_cpu.md). So a loop runs on one thread
# below this many rows (where the split gains little) and whenever fewer cores are free than
# torch's threads; above it, on an idle machine, it keeps torch's threads.
PARALLEL_MIN_ROWS = 2**18


def busy_cores() -> int:
    """Runnable threads of other processes (``/proc/loadavg``'s running count, an
    instantaneous sample, less this process's running threads); 0 where the counts are
    unavailable.

    This process's own threads are left out: OpenMP's workers spin for a while after a
    parallel region, and counted, they made an idle 2-core machine look half busy after
    every meta-step (a sample after each of 20 meta-steps: 1, sometimes 2; with them left out:
    0 on the idle machine, 1 with one other busy process).

    >>> busy_cores() >= 0
    True
    """
    try:
        with open("/proc/loadavg") as handle:
            running = int(handle.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0
    if running <= 1:  # the caller alone: no need to count our threads
        return 0
    return max(0, running - _own_running_threads())


def _own_running_threads() -> int:
    """This process's threads in state R (the caller at least); 1 where unreadable."""
    own = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as handle:
                # the state follows the command name, which may itself hold ") "
                own += handle.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
    return max(own, 1)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count.

    >>> usable_cores() >= 1
    True
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def chunk_loop_threads(device: torch.device, rows: int) -> int | None:
    """Torch threads for a chunked loop over ``rows`` rows on ``device``: 1 on a CPU for small
    loops or when fewer cores are free than threads; ``None`` (leave torch's setting) otherwise.

    >>> chunk_loop_threads(torch.device("cpu"), 1000) in (1, None)  # None if 1 thread anyway
    True
    >>> chunk_loop_threads(torch.device("cuda"), 10**8) is None
    True
    """
    if not _on_cpu(device) or torch.get_num_threads() == 1:
        return None
    if rows < PARALLEL_MIN_ROWS:
        return 1
    free = usable_cores() - busy_cores()
    return 1 if free < torch.get_num_threads() else None


def meta_step_threads(device: torch.device) -> int | None:
    """Torch threads for a meta-step under ``threads="auto"``: on a CPU where fewer cores
    are free than torch's threads, as many as are free (at least one), else ``None`` (leave
    torch's setting).

    With one of 2 cores held by another process, every parallel region of a meta-step (the
    learner's convolutions, the fused kernels) waits at its end for the thread whose core is
    taken: Omniglot meta-steps took 1.5-2.2x less time on one thread than on two
    (docs/results/cpu_speed.md). On an idle machine the threads are kept.

    >>> meta_step_threads(torch.device("cuda")) is None
    True
    """
    if not _on_cpu(device) or torch.get_num_threads() == 1:
        return None
    free = usable_cores() - busy_cores()
    return max(1, free) if free < torch.get_num_threads() else None


@contextlib.contextmanager
def threads_for_meta_step(device: torch.device, adaptive: bool) -> Iterator[None]:
    """Run the block with :func:`meta_step_threads`' threads if ``adaptive``, restoring
    torch's afterwards; with torch's threads otherwise.

    >>> with threads_for_meta_step(torch.device("cpu"), adaptive=True):
    ...     pass
    """
    with _threads(meta_step_threads(device) if adaptive else None):
        yield


@contextlib.contextmanager
def threads_for_chunk_loop(device: torch.device, rows: int) -> Iterator[None]:
    """Run the block with :func:`chunk_loop_threads`' threads, restoring torch's afterwards.

    >>> before = torch.get_num_threads()
    >>> with threads_for_chunk_loop(torch.device("cpu"), 10):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    with _threads(chunk_loop_threads(device, rows)):
        yield


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# The paths a step may take on the autograd tape (learned_optim.rule.tape): the anchored
# first-order trajectory (replayed chunk by chunk), one node per step with the hand-written
# backward (recomputed), every operation recorded by autograd, one node per step whose
# forward and recomputing backward are compiled by torch.compile (learned_optim.rule.compiled),
# one node per step of hand-fused C++ kernels (learned_optim.rule.native_tape), and on a CUDA
# device one node per step of Triton kernels (learned_optim.rule.triton_tape).
TAPE_PATHS = ("trajectory", "recomputed", "recorded", "compiled", "native", "triton")
# Steps on a CPU take the native node, first order and second order alike, or the compiled
# node where the native kernels do not build (LEARNED_OPTIM_COMPILE=0 turns both off).
# Measured on the 2-core Xeon at 28,485 rows, T = 12 steps and the backward
# (benchmarks/meta_train.py --reference, "rule:" rows, medians of 7 interleaved rounds): the
# compiled node, 2 threads, 165 ms against 437 for the trajectory, 485 for the hand-written
# backward and 308 recorded op by op; one thread, 352 against 578, 698 and 593. The native
# node against the compiled one: see tape_path.
# Compilation (20 to 40 s a process) pays for itself within a few hundred meta-steps.
# Below COMPILED_MIN_ROWS a step is too cheap to matter; above COMPILED_MAX_ROWS the
# tape's saved states (one per step for all rows) outgrow what the chunked paths bound.
COMPILE_RULE = os.environ.get("LEARNED_OPTIM_COMPILE", "1").strip() not in ("0", "false", "no")
# (4,097: above inductor's 4,096-element threshold for its CPU reductions, the graph that the
# probe of learned_optim.rule.compiled compiles serves every size of the range.)
COMPILED_MIN_ROWS = 4097
COMPILED_MAX_ROWS = 2**18
# At most this many rows, a CPU running torch on one thread records the rule op by op. Off
# (0): measured on the 2-core EPYC, one thread, T = 12 + backward (benchmarks/rule_kernels.py,
# docs/results/rule_kernels.md), recording wins only at small sizes (1.2x faster at 5,000 rows)
# and loses at the meta-learners' sizes (2x slower at 29,000); and its backward runs later, on
# the caller's threads, out of this policy's reach: with 2 threads on busy cores it took 12x
# the trajectory at 28,485 rows (docs/results/meta_train_reference.md, (b0) against (b)). A
# caller that knows its threads stay at one may raise it.
RECORDED_MAX_ROWS = 0


def tape_path(device: torch.device, rows: int, first_order: bool) -> str:
    """The fastest path for ``rows`` rows on ``device`` (one of :data:`TAPE_PATHS`).

    ``first_order``: the step's gradient and loss are constants, so it may join a trajectory.
    On a CPU, float32 steps of ``COMPILED_MIN_ROWS`` to ``COMPILED_MAX_ROWS`` rows take the
    native node in either order (where its kernels build; else the compiled node, where
    compilation works: :mod:`learned_optim.rule.tape` checks). Measured on the 2-core Xeon at
    28,485 rows, T = 12 steps and the backward, interleaved (``benchmarks/meta_train.py
    --reference``, "rule:" rows, medians) the native node took 0.9-1.15x the compiled node's
    time on 2 threads, and 0.7-0.97x in a loop of the rule alone; a whole 5-way 1-shot
    meta-step was 1.04x faster with it (docs/results/cpu_speed.md, session 19). It needs no
    ``torch.compile`` (20-40 s a fresh machine) and sums in double, deterministically.

    On a CUDA device, second-order float32 steps of up to ``COMPILED_MAX_ROWS`` rows take the
    Triton node (where Triton works; :mod:`learned_optim.rule.tape` checks): two launches a
    step instead of the eager paths' dozens, which on an H200 left the GPU idle most of a
    meta-step (docs/results/meta_train_cuda.md). First order keeps the trajectory, which there
    runs the same Triton kernels (forward, replay and backward) and saves 4 bytes a
    coordinate and step where a node saves 176. Not yet timed on a GPU.

    >>> gpu = torch.device("cuda")
    >>> tape_path(gpu, 30_000, first_order=True), tape_path(gpu, 30_000, first_order=False)
    ('trajectory', 'triton')
    """
    if _on_cpu(device) and rows <= RECORDED_MAX_ROWS and torch.get_num_threads() == 1:
        return "recorded"
    if in_compiled_range(device, rows):
        return "native"
    if not first_order and COMPILE_RULE and device.type == "cuda" and rows <= COMPILED_MAX_ROWS:
        return "triton"
    return "trajectory" if first_order else "recomputed"


def in_compiled_range(device: torch.device, rows: int) -> bool:
    """Whether a step of ``rows`` rows on ``device`` is the compiled node's (when on, on a CPU,
    ``COMPILED_MIN_ROWS`` to ``COMPILED_MAX_ROWS``).

    >>> in_compiled_range(torch.device("cuda"), 30_000)
    False
    """
    return COMPILE_RULE and _on_cpu(device) and COMPILED_MIN_ROWS <= rows <= COMPILED_MAX_ROWS


def step_compiles(device: torch.device, dtype: torch.dtype, rows: int) -> bool:
    """Whether the in-place ``step()`` runs a chunk of ``rows`` rows through the compiled
    forward (learned_optim.rule.compiled.step_rows_compiled): on a CPU, float32, at least
    ``COMPILED_MIN_ROWS`` rows (smaller chunks would compile another graph), when on. Measured
    on the 2-core Xeon, 2 threads, chunks of 8,192 rows: 14 against 24 ms at 55,000
    coordinates, 197 against 422 ms at 1M.

    >>> step_compiles(torch.device("cuda"), torch.float32, 8192)
    False
    >>> step_compiles(torch.device("cpu"), torch.float64, 8192)
    False
    """
    return (COMPILE_RULE and _on_cpu(device) and dtype == torch.float32
            and rows >= COMPILED_MIN_ROWS)


def step_native(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the in-place ``step()`` runs the hand-fused kernel
    (learned_optim.rule.native.step_bucket_native), one call a bucket: on a CPU, float32,
    when on. Measured on the 2-core Xeon, 2 threads, against the chunk paths in one run
    (benchmarks/step_native.py, load average 1.2-1.5): 7.8 against 14.0 ms at 55,050
    coordinates and 132 against 244 ms at 1M, before the state buffers became feature-major;
    6.4 against 19.6 ms and 89 against 246 ms after.

    >>> step_native(torch.device("cuda"), torch.float32)
    False
    >>> step_native(torch.device("cpu"), torch.float64)
    False
    """
    return COMPILE_RULE and _on_cpu(device) and dtype == torch.float32


def step_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the in-place ``step()`` runs the Triton kernel
    (learned_optim.rule.triton_step.step_bucket_triton), one launch a bucket: on a CUDA
    device, float32, when on (where Triton imports and the kernel compiles there; else the
    chunk paths). Not yet timed on a GPU against the chunk path (benchmarks/step_gpu.py).

    >>> step_triton(torch.device("cpu"), torch.float32)
    False
    >>> step_triton(torch.device("cuda"), torch.float64)
    False
    """
    return COMPILE_RULE and device.type == "cuda" and dtype == torch.float32


def trajectory_triton(device: torch.device) -> bool:
    """Whether a first-order trajectory's steps and replay run the Triton kernels
    (learned_optim.rule.triton_tape) on ``device``: on a CUDA device, when on (where Triton
    works; :mod:`learned_optim.rule.tape` checks). Not on a CPU, even where Triton's
    interpreter is switched on (``TRITON_INTERPRET=1``, for someone's own kernels).

    >>> trajectory_triton(torch.device("cpu"))
    False
    """
    return COMPILE_RULE and device.type == "cuda"


def step_threads(device: torch.device, dtype: torch.dtype, rows: int,
                 chunk_rows: int) -> int | None:
    """Torch threads for the in-place ``step()`` over ``rows`` rows in chunks of
    ``chunk_rows``: torch's own where the step takes the native kernel (which runs one thread
    below a few thousand rows by itself) or its chunks the compiled forward (a few fused loops
    a chunk, and a changed thread count would compile it again), else
    :func:`chunk_loop_threads`.

    >>> step_threads(torch.device("cuda"), torch.float32, 10**6, 2**18) is None
    True
    """
    if step_native(device, dtype) or step_compiles(device, dtype, min(rows, chunk_rows)):
        return None
    return chunk_loop_threads(device, rows)


@contextlib.contextmanager
def threads_for_step(device: torch.device, dtype: torch.dtype, rows: int,
                     chunk_rows: int) -> Iterator[None]:
    """Run the block with :func:`step_threads`' threads, restoring torch's afterwards.

    >>> with threads_for_step(torch.device("cpu"), torch.float32, 10, 8192):
    ...     pass
    """
    with _threads(step_threads(device, dtype, rows, chunk_rows)):
        yield


def tape_step_threads(device: torch.device, rows: int) -> int | None:
    """Torch threads for a step on the tape (the learner's backward and the rule's update).

    A step of the compiled node's range keeps torch's threads (``None``): its update is a few
    large fused loops, not the chunk loops' thousands of small parallel regions, and a thread
    count that changed between calls would also compile its graphs again (inductor's graphs
    are specialised to it). Other steps take :func:`chunk_loop_threads`.

    >>> tape_step_threads(torch.device("cuda"), 10**6) is None
    True
    """
    if in_compiled_range(device, rows):
        return None
    return chunk_loop_threads(device, rows)


@contextlib.contextmanager
def threads_for_tape_step(device: torch.device, rows: int) -> Iterator[None]:
    """Run the block with :func:`tape_step_threads`' threads, restoring torch's afterwards.

    >>> with threads_for_tape_step(torch.device("cpu"), 30_000):
    ...     pass
    """
    with _threads(tape_step_threads(device, rows)):
        yield
