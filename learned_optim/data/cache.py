"""Where decoded data sets are cached, and how cache files are written and read.

Cache files are plain ``.npz`` archives (no pickled objects), named by a hash of everything
that determines their content, and written atomically so that an interrupted run never
leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["default_cache_dir", "cache_file", "save_arrays", "load_arrays"]

CACHE_ENV = "LEARNED_OPTIM_CACHE"


def default_cache_dir() -> Path:
    """``$LEARNED_OPTIM_CACHE`` if set, else ``~/.cache/learned_optim``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "learned_optim"


def cache_file(cache_dir: str | os.PathLike | None, prefix: str, key: object) -> Path:
    """The cache path for ``key`` (any JSON-serialisable description of the content).

    Examples
    --------
    >>> cache_file("/tmp/c", "omniglot_28px", {"size": 1}).name
    'omniglot_28px_ce9ae3ceabbd8774.npz'
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return directory / f"{prefix}_{digest}.npz"


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``, atomically.

    The data go to a temporary file in the same folder first, then ``os.replace`` moves it
    into place, so readers see either no file or a complete one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)  # uncompressed: loading must be fast
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """Read a cache file written by :func:`save_arrays`; ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError):
        return None  # a corrupt cache is rebuilt, not fatal
