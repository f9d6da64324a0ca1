"""download_verified: checksum-checked downloads that never leave partial files."""

from __future__ import annotations

import hashlib

import pytest

from learned_optim.data import download


def _serve(payload: bytes):
    def fetch(url, destination, timeout=60.0):
        destination.write_bytes(payload)

    return fetch


def test_matching_checksum_moves_the_file_into_place(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch_url", _serve(b"omniglot"))
    md5 = hashlib.md5(b"omniglot").hexdigest()
    path = download.download_verified("https://example.org/a.zip", tmp_path / "a.zip", md5)
    assert path.read_bytes() == b"omniglot"
    assert [p.name for p in tmp_path.iterdir()] == ["a.zip"]


def test_wrong_checksum_deletes_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch_url", _serve(b"tampered"))
    with pytest.raises(ValueError, match="checksum mismatch for https://example.org/a.zip"):
        download.download_verified("https://example.org/a.zip", tmp_path / "a.zip", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_md5_of_reads_the_whole_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1_000_000)
    assert download.md5_of(tmp_path / "f") == hashlib.md5(b"abc" * 1_000_000).hexdigest()
