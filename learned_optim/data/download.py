"""Downloading files with a checksum check, using only the standard library."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["fetch_url", "download_verified", "md5_of"]


def fetch_url(url: str, destination: Path, timeout: float = 60.0) -> None:
    """Copy the bytes at ``url`` into the file ``destination`` (no checks)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as out:
        shutil.copyfileobj(response, out)


def md5_of(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(url: str, destination: Path, md5: str) -> Path:
    """Download ``url`` to ``destination`` if its MD5 is ``md5``.

    The bytes go to a temporary file beside ``destination``, are checked, then renamed into
    place; on a wrong checksum the temporary file is deleted and nothing is left behind.

    Raises
    ------
    ValueError
        If the downloaded file's MD5 differs from ``md5``.
    OSError
        If the download itself fails (``urllib.error.URLError`` is an ``OSError``).
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=destination.parent, prefix=destination.name + ".")
    os.close(handle)
    tmp = Path(name)
    try:
        fetch_url(url, tmp)
        actual = md5_of(tmp)
        if actual != md5:
            raise ValueError(
                f"checksum mismatch for {url}: MD5 {actual}, expected {md5}; "
                f"the download was deleted ({destination} was not written)"
            )
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination
