"""Small helpers the benchmark scripts share (imported as a sibling module)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time


def load_average() -> str:
    """The 1/5/15-minute load averages, so readers can judge the timings printed beside them."""
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"


def without_compiled_rule(fn):
    """``fn`` run with the policy's compiled and fused rule kernels off
    (``LEARNED_OPTIM_COMPILE=0``): the package's eager paths, in the same process."""
    from learned_optim.rule import policy

    def run():
        saved, policy.COMPILE_RULE = policy.COMPILE_RULE, False
        try:
            return fn()
        finally:
            policy.COMPILE_RULE = saved
    return run


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C++ chatter on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# The busy process of --contended: a single-threaded torch loop that stops on its own when its
# parent is gone (so that it never outlives a killed benchmark).
_BUSY_LOOP = """
import os, sys
os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1)
parent = int(sys.argv[1])
a = torch.randn(256, 256)
while os.getppid() == parent:
    for _ in range(50):
        a = torch.tanh(a @ a * 0.01)
"""


@contextlib.contextmanager
def busy_process(enabled: bool = True):
    """Run one busy single-threaded process of our own while the block runs (``--contended``).

    It competes for a core as a DataLoader worker or another user's job would; it is stopped
    when the block ends, on an error too. Does nothing when ``enabled`` is false.
    """
    if not enabled:
        yield None
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(os.getpid())], env=env,
                               stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let it start (importing torch) before anything is timed
        if process.poll() is not None:
            raise RuntimeError(f"the busy process of --contended exited ({process.returncode})")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
