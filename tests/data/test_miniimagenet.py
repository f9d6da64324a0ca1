"""miniImageNet: the real Ravi & Larochelle split file over generated stand-in images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from learned_optim.data import miniimagenet
from learned_optim.data.miniimagenet import read_split_csv

PER_CLASS = 5


@pytest.fixture(scope="module")
def real_test_csv(shared_data):
    return shared_data / "miniimagenet" / "splits" / "test.csv"


@pytest.fixture(scope="module")
def root(real_test_csv, tmp_path_factory):
    """images/ with the first 5 files of each of the 20 test classes, solid random colours."""
    filenames, labels = read_split_csv(real_test_csv)
    root = tmp_path_factory.mktemp("miniimagenet")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows, seen = [], {}
    for filename, label in zip(filenames, labels):
        if seen.get(label, 0) < PER_CLASS:
            seen[label] = seen.get(label, 0) + 1
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
            Image.new("RGB", size, colour).save(root / "images" / filename, quality=95)
            rows.append((filename, label, colour))
    with open(root / "test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        writer.writerows(row[:2] for row in rows)
    return root, rows


def test_real_split_file_has_20_classes_of_600(real_test_csv):
    filenames, labels = read_split_csv(real_test_csv)
    assert len(filenames) == 12_000 and len(set(labels)) == 20
    assert filenames[0] == "n0193011200000001.jpg" and labels[0] == "n01930112"


def test_loads_20_classes_in_csv_order(root, tmp_path):
    folder, rows = root
    data = miniimagenet(folder, "test", cache_dir=tmp_path)
    assert data.num_classes == 20
    assert data.class_sizes.tolist() == [PER_CLASS] * 20
    assert data.class_names == list(dict.fromkeys(label for _, label, _ in rows))
    assert data.class_names[0] == "n01930112"


def test_images_are_rgb_resized_to_84_with_their_colour(root, tmp_path):
    folder, rows = root
    data = miniimagenet(folder, "test", cache_dir=tmp_path)
    assert data.inputs.shape == (100, 3, 84, 84) and data.inputs.dtype == torch.float32
    colours = torch.tensor([colour for _, _, colour in rows], dtype=torch.float32) / 255
    # solid-colour JPEGs decode to within a few levels of their colour
    torch.testing.assert_close(data.inputs.mean(dim=(2, 3)), colours, atol=3 / 255, rtol=0)


def test_image_size_option_resizes(root, tmp_path):
    data = miniimagenet(root[0], "test", image_size=32, cache_dir=tmp_path)
    assert data.inputs.shape == (100, 3, 32, 32)


def test_second_load_comes_from_the_cache(root, tmp_path):
    first = miniimagenet(root[0], "test", cache_dir=tmp_path)
    cached = list(tmp_path.glob("miniimagenet_test_84px_*.npz"))
    assert len(cached) == 1
    written = cached[0].stat().st_mtime_ns
    again = miniimagenet(root[0], "test", cache_dir=tmp_path)
    assert torch.equal(first.inputs, again.inputs)
    assert cached[0].stat().st_mtime_ns == written


def test_csv_dir_overrides_where_split_files_are(root, tmp_path):
    folder, _ = root
    csv_dir = tmp_path / "splits"
    csv_dir.mkdir()
    (csv_dir / "test.csv").write_text("filename,label\nn0193011200000001.jpg,n01930112\n")
    data = miniimagenet(folder, "test", csv_dir=csv_dir, cache_dir=tmp_path)
    assert len(data) == 1 and data.class_names == ["n01930112"]


def test_missing_images_raise_with_count_and_first_path(real_test_csv, root, tmp_path):
    folder, _ = root
    with pytest.raises(FileNotFoundError) as error:
        miniimagenet(folder, "test", csv_dir=real_test_csv.parent, cache_dir=tmp_path)
    message = str(error.value)
    assert "11900 of the 12000 miniImageNet images" in message
    assert f"first missing: {folder / 'images' / 'n0193011200000011.jpg'}" in message
    assert "not downloadable" in message


def test_missing_split_file_and_bad_header_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="split file not found: .*val.csv"):
        miniimagenet(tmp_path, "val", cache_dir=tmp_path)
    (tmp_path / "val.csv").write_text("file,class\na.jpg,n0\n")
    with pytest.raises(ValueError, match="expected the header 'filename,label'"):
        miniimagenet(tmp_path, "val", cache_dir=tmp_path)


def test_unknown_split_raises(tmp_path):
    with pytest.raises(ValueError, match="miniImageNet split must be one of"):
        miniimagenet(tmp_path, "validation")
