"""Omniglot: split sizes of both protocols, pixels, rotations, cache, folders, download errors."""

from __future__ import annotations

import time
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from learned_optim.data import download, omniglot
from learned_optim.data.omniglot import load_omniglot_characters, omniglot_split_characters


@pytest.fixture(scope="module")
def vinyals_test(omniglot_root, omniglot_cache):
    return omniglot(omniglot_root, "test", cache_dir=omniglot_cache)


@pytest.mark.parametrize(
    ("protocol", "split", "classes"),
    [
        ("vinyals", "train", 4400),
        ("vinyals", "val", 400),
        ("vinyals", "trainval", 4800),
        ("vinyals", "test", 1692),
        ("lake", "train", 868),
        ("lake", "val", 96),
        ("lake", "test", 659),
    ],
)
def test_split_has_the_documented_classes_of_20_drawers(
    omniglot_root, omniglot_cache, protocol, split, classes
):
    data = omniglot(omniglot_root, split, protocol, cache_dir=omniglot_cache)
    assert data.num_classes == classes
    assert data.class_sizes.min().item() == data.class_sizes.max().item() == 20
    assert data.inputs.shape == (20 * classes, 1, 28, 28)


def test_vinyals_splits_partition_all_1623_characters(omniglot_root, omniglot_cache):
    archive = load_omniglot_characters(omniglot_root, cache_dir=omniglot_cache)["archive"]
    parts = [omniglot_split_characters(archive, s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1100, 100, 423]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1623))


def test_lake_splits_follow_the_background_and_evaluation_alphabets(omniglot_root, omniglot_cache):
    arrays = load_omniglot_characters(omniglot_root, cache_dir=omniglot_cache)
    alphabets = {}
    for split in ("train", "val", "test"):
        chosen = omniglot_split_characters(arrays["archive"], split, "lake")
        alphabets[split] = {str(name).split("/")[0] for name in arrays["names"][chosen]}
    assert len(alphabets["train"]) == 30 and alphabets["val"] <= alphabets["train"]
    assert len(alphabets["test"]) == 20 and not alphabets["test"] & alphabets["train"]
    assert "Angelic" in alphabets["test"] and "Latin" in alphabets["train"]


def test_vinyals_split_is_pinned_by_its_fixed_seed(omniglot_root, omniglot_cache):
    arrays = load_omniglot_characters(omniglot_root, cache_dir=omniglot_cache)
    val = arrays["names"][omniglot_split_characters(arrays["archive"], "val")]
    assert list(val[:3]) == [
        "Alphabet_of_the_Magi/character12",
        "Anglo-Saxon_Futhorc/character03",
        "Anglo-Saxon_Futhorc/character08",
    ]
    again = omniglot_split_characters(arrays["archive"].copy(), "val")
    assert np.array_equal(again, omniglot_split_characters(arrays["archive"], "val"))


def test_pixels_are_float_ink_one_on_background_zero(vinyals_test):
    inputs = vinyals_test.inputs
    assert inputs.dtype == torch.float32
    assert inputs.min().item() == 0.0 and inputs.max().item() == 1.0
    assert inputs.median().item() == 0.0  # mostly background
    assert 0.06 < inputs.mean().item() < 0.11  # ~8% ink over all 1623 characters


def test_ink_fraction_of_latin_a_matches_the_original_png(omniglot_root, omniglot_cache):
    with zipfile.ZipFile(omniglot_root / "images_background.zip") as archive:
        member = "images_background/Latin/character01/0683_01.png"
        original = np.asarray(Image.open(archive.open(member)))  # True = white background
    ink_105 = 1.0 - original.mean()
    assert 0.04 < ink_105 < 0.06
    data = omniglot(omniglot_root, "train", "lake", cache_dir=omniglot_cache)
    image = data.examples_of(data.class_names.index("Latin/character01"))[0]
    assert image.mean().item() == pytest.approx(ink_105, rel=0.1)  # resizing keeps the ink area


def test_rotation_classes_are_the_character_rotated_counterclockwise(vinyals_test):
    name = vinyals_test.class_names[40]
    assert vinyals_test.class_names[41:44] == [f"{name}@rot90", f"{name}@rot180", f"{name}@rot270"]
    upright = vinyals_test.examples_of(40)
    for k in (1, 2, 3):
        rotated = vinyals_test.examples_of(40 + k)
        assert torch.equal(rotated, torch.rot90(upright, k, dims=(2, 3)))
        assert not torch.equal(rotated, upright)


def test_second_load_reuses_the_cache_file_in_under_2_seconds(omniglot_root, omniglot_cache):
    files = list(omniglot_cache.glob("omniglot_28px_*.npz"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    start = time.perf_counter()
    omniglot(omniglot_root, "test", cache_dir=omniglot_cache)
    assert time.perf_counter() - start < 2.0
    assert files[0].stat().st_mtime_ns == written
    assert list(omniglot_cache.glob("*.tmp")) == []


def test_extracted_folders_give_the_same_images_as_the_zips(
    omniglot_root, omniglot_cache, tmp_path
):
    root = tmp_path / "omniglot"
    for archive, alphabets in [
        ("images_background", ("Latin", "Greek")),
        ("images_evaluation", ("Angelic",)),
    ]:
        with zipfile.ZipFile(omniglot_root / f"{archive}.zip") as source:
            members = [
                m for m in source.namelist() if m.split("/")[1] in alphabets and m.endswith(".png")
            ]
            source.extractall(root, members)
    from_folders = omniglot(root, "test", "lake", cache_dir=tmp_path / "cache")
    from_zips = omniglot(omniglot_root, "test", "lake", cache_dir=omniglot_cache)
    assert from_folders.num_classes == 20  # Angelic has 20 characters
    assert from_folders.class_names == from_zips.class_names[:20]
    assert torch.equal(from_folders.inputs, from_zips.inputs[: 20 * 20])


def test_vinyals_on_a_partial_copy_raises(tmp_path, omniglot_root):
    for archive in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(omniglot_root / f"{archive}.zip") as source:
            first = sorted(m for m in source.namelist() if m.endswith(".png"))[:20]
            source.extractall(tmp_path / "root", first)
    with pytest.raises(ValueError, match="needs all 1623 Omniglot characters, found 2"):
        omniglot(tmp_path / "root", "train", cache_dir=tmp_path / "cache")


def test_missing_archives_raise_saying_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        omniglot(tmp_path, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert f"not found in {tmp_path}" in message
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert "download=True" in message


def test_failed_download_raises_file_not_found(tmp_path, monkeypatch):
    def offline(url, destination, timeout=60.0):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(download, "fetch_url", offline)
    with pytest.raises(FileNotFoundError, match="download of https://github.com/.*failed"):
        omniglot(tmp_path, download=True, cache_dir=tmp_path / "cache")
    assert list(tmp_path.glob("*.zip*")) == []


def test_download_with_a_wrong_checksum_raises_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(
        download, "fetch_url", lambda url, destination, timeout=60.0: destination.write_bytes(b"x")
    )
    with pytest.raises(ValueError, match="checksum mismatch .*68d2efa1b9178cc56df9314c21c6e718"):
        omniglot(tmp_path, download=True, cache_dir=tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []  # neither the download nor a temporary file is left


@pytest.mark.parametrize(("option", "value"), [("split", "dev"), ("protocol", "maml")])
def test_unknown_split_or_protocol_raises(omniglot_root, option, value):
    with pytest.raises(ValueError, match=f"Omniglot {option} must be one of"):
        omniglot(omniglot_root, **{option: value})
