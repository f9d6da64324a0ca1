"""Meta-training over several processes with ``torch.distributed`` (launched by ``torchrun``).

Under ``torchrun`` every process (rank) runs the same training routine. Each meta-step splits
its ``meta_batch`` episodes across the ranks, and one all-reduce sums their meta-gradients, so
every rank takes the same Adam step and the weights stay identical without further traffic.
Rank 0 alone writes the run folder. Outside ``torchrun`` (no ``WORLD_SIZE`` > 1 in the
environment) every helper here is a no-op and training is a single process, as before.

Environment:

- ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``: set by
  ``torchrun`` (or by hand, see ``docs/howto-distributed.md``).
- ``LEARNED_OPTIM_DIST_TIMEOUT``: seconds a collective waits for the other ranks before it
  fails (default 300), so that a dead or stalled rank stops the run instead of hanging it.

Examples
--------
>>> world()  # a plain process
(0, 1)
>>> is_main()
True
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
from torch import Tensor
from torch import distributed as dist

__all__ = ["DistributedError", "world", "is_main", "is_distributed", "init_from_env", "shutdown",
           "timeout_s", "device_for", "rank_slots", "all_reduce_sum_", "broadcast_",
           "on_main", "barrier", "any_true"]

TIMEOUT_ENV = "LEARNED_OPTIM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, stalled past the timeout or lost the network."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside a distributed launch.

    Read from the process group when one is initialised, otherwise from the ``torchrun``
    environment (so it stays right after :func:`shutdown`).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    size = _env_int("WORLD_SIZE", 1)
    return (_env_int("RANK", 0), size) if size > 1 else (0, 1)


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return world()[0] == 0


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def timeout_s() -> float:
    """Seconds a collective waits (``LEARNED_OPTIM_DIST_TIMEOUT``, default 300)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {text!r}")
    return value


def device_for(device: str | torch.device) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a distributed run."""
    device = torch.device(device)
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group ``torchrun`` describes; returns whether this call created it.

    Nothing happens outside ``torchrun`` (``WORLD_SIZE`` unset or 1) or when the caller has
    already initialised a group. The backend is NCCL for CUDA devices, gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return False
    rank, size = world()
    if size == 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    device = device_for(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"rank {rank} of {size} could not join the process group ({backend}) at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {error}"
        ) from error
    return True


def shutdown() -> None:
    """Leave the process group (if one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_slots(count: int) -> range:
    """This rank's share of ``range(count)``: slots ``rank, rank + W, rank + 2W, ...``."""
    rank, size = world()
    return range(rank, count, size)


def _lost(what: str, error: BaseException) -> DistributedError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DistributedError(
        f"lost contact with the other ranks during {what}: another rank probably died (see "
        f"its output) or stalled for more than {timeout_s():g} s ({TIMEOUT_ENV}). "
        f"[{detail}]"
    )


def all_reduce_sum_(tensors: Sequence[Tensor], what: str = "an all-reduce") -> None:
    """Sum ``tensors`` over the ranks, in place, with ONE all-reduce of their concatenation."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except RuntimeError as error:
        raise _lost(what, error) from error
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_(tensors: Sequence[Tensor], what: str = "a broadcast") -> None:
    """Overwrite ``tensors`` with rank 0's values, in one broadcast per dtype."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        try:
            dist.broadcast(flat, src=0)
        except RuntimeError as error:
            raise _lost(what, error) from error
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def any_true(flag: bool, what: str = "an all-reduce") -> bool:
    """Whether ``flag`` holds on at least one rank (all ranks get the same answer)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    all_reduce_sum_([value], what)
    return bool(value.item() > 0)


def barrier(what: str = "a barrier") -> None:
    """Wait for every rank."""
    if not is_distributed():
        return
    try:
        dist.barrier()
    except RuntimeError as error:
        raise _lost(what, error) from error


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_main(function: Callable[[], T], what: str = "a step on rank 0") -> T:
    """Run ``function`` on rank 0 only and give its result, or its exception, to every rank.

    Decisions about the run folder (does it already hold a run? does the saved configuration
    match?) are taken once, by the rank that owns the files, and every rank then returns the
    same value or raises the same error: no rank is left waiting for one that stopped.
    """
    if not is_distributed():
        return function()
    outcome: list = [None]
    own_error = None
    if is_main():
        try:
            outcome[0] = ("value", function())
        except Exception as error:  # handed to every rank, then raised there
            own_error = error
            outcome[0] = ("error", _picklable(error))
    try:
        dist.broadcast_object_list(outcome, src=0)
    except RuntimeError as error:
        raise _lost(what, error) from error
    kind, payload = outcome[0]
    if own_error is not None:
        raise own_error
    if kind == "error":
        raise payload
    return payload


def _picklable(error: Exception) -> Exception:
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return copy
