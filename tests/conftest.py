"""Shared fixtures: the real data sets beside the repository, small real models."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits(shared_data) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits: 1,797 images of 8x8 as float32 [n, 64] in [0, 1] and int64 labels."""
    with gzip.open(shared_data / "sklearn_digits" / "digits.csv.gz", "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.float32)
    inputs = torch.from_numpy(table[:, :64] / 16.0)
    labels = torch.from_numpy(table[:, 64].astype(np.int64))
    return inputs, labels


@pytest.fixture
def threads():
    """Set torch's thread count for one test (the suite runs on one); restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def default_dtype():
    """Set torch's default dtype for one test (as ``torch.set_default_dtype``); restored
    after."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


@pytest.fixture
def no_cpp_compiler(monkeypatch):
    """Make building C++ kernels fail ("no C++ compiler found"); call it with the
    ``NativeKernel`` objects to forget their earlier build."""
    from torch._inductor import codecache

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", no_compiler)

    def unbuild(*kernels) -> None:
        for kernel in kernels:
            monkeypatch.setattr(kernel, "kernel", None)
            monkeypatch.setattr(kernel, "failure", None)

    return unbuild


# The test models are tiny: intra-op threads only add scheduling overhead, and on a loaded
# machine they make small kernels wait for descheduled workers.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def omniglot_support_set(shared_data) -> tuple[torch.Tensor, torch.Tensor]:
    """A real 5-way 5-shot Omniglot support set (25 images, 28 x 28) and its labels."""
    from learned_optim.data import EpisodeSampler, omniglot

    sampler = EpisodeSampler(omniglot(shared_data / "omniglot", "val", "lake"), ways=5,
                             shots=5, queries=1, seed=4)
    episode = sampler.episode(0)
    return episode.support_inputs, episode.support_targets


@pytest.fixture
def second_order_meta_gradient(omniglot_support_set):
    """A function giving the meta-gradient of two second-order SGD steps (lr 0.1, through
    ``higher``) of the paper's learner (8 filters, NCHW, as second-order meta-training runs
    it) on :func:`omniglot_support_set`, flattened: the learner's kernels against its modules."""
    import higher
    from torch.nn import functional as F

    from learned_optim.learners import ConvLearner

    inputs, targets = omniglot_support_set

    def meta_gradient() -> torch.Tensor:
        torch.manual_seed(1)
        learner = ConvLearner(1, ways=5, filters=8, image_size=28, channels_last=False)
        opt = torch.optim.SGD(learner.parameters(), lr=0.1)
        with higher.innerloop_ctx(learner, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.cross_entropy(fmodel(inputs), targets))
            F.cross_entropy(fmodel(inputs), targets).backward()
        return torch.cat([p.grad.flatten() for p in learner.parameters()])

    return meta_gradient


class LearnerPasses:
    """Second-order passes through a learner, as the kernel tests drive them: a gradient of
    its gradient, a pass under ``torch.func``, and two passes recording the warnings."""

    def __init__(self, learner: torch.nn.Module, inputs: torch.Tensor) -> None:
        self.learner, self.inputs = learner, inputs

    def gradient_of_gradient(self) -> tuple[torch.Tensor, ...]:
        params = dict(self.learner.named_parameters())
        out = torch.func.functional_call(self.learner, params, (self.inputs,))
        grads = torch.autograd.grad(out.square().sum(), list(params.values()),
                                    create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), list(params.values()))

    def under_torch_func(self) -> None:
        params = {name: p.detach() for name, p in self.learner.named_parameters()}
        buffers = dict(self.learner.named_buffers())  # inputs, so that they may be updated
        torch.func.grad(lambda p, b: torch.func.functional_call(
            self.learner, {**p, **b}, (self.inputs,)).sum())(params, buffers)

    def warnings_of_two_passes(self, about: str) -> list[str]:
        """The warnings mentioning ``about`` of two second-order backward passes (which
        leave ``.grad`` on the learner's parameters)."""
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                grads = torch.autograd.grad(self.learner(self.inputs).square().sum(),
                                            list(self.learner.parameters()), create_graph=True)
                sum(g.square().sum() for g in grads).backward()
        return [str(w.message) for w in caught if about in str(w.message)]


@pytest.fixture
def learner_passes():
    """:class:`LearnerPasses`, for a learner and its inputs."""
    return LearnerPasses


@pytest.fixture
def kernel_calls(monkeypatch):
    """A function recording the calls of a built :class:`NativeKernel` (which still runs):
    ``kernel_calls(native_kernel, what)`` returns the list that ``what(args)`` (default 1) is
    appended to at each call."""

    def record(native_kernel, what=lambda args: 1) -> list:
        calls, kernel = [], native_kernel()
        monkeypatch.setattr(native_kernel, "kernel",
                            lambda *args: calls.append(what(args)) or kernel(*args))
        return calls

    return record
