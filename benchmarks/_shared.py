"""Small helpers the benchmark scripts share (imported as a sibling module)."""

from __future__ import annotations

import contextlib
import os
import sys


def load_average() -> str:
    """The 1/5/15-minute load averages, so readers can judge the timings printed beside them."""
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"


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
