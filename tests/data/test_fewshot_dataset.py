"""FewShotDataset: class bookkeeping, construction from arrays, validation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from learned_optim.data import FewShotDataset


@pytest.fixture(scope="module")
def digits(shared_data) -> FewShotDataset:
    with gzip.open(shared_data / "sklearn_digits" / "digits.csv.gz", "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return FewShotDataset.from_arrays(
        (table[:, :64] / 16.0).reshape(-1, 1, 8, 8), table[:, 64], name="digits"
    )


def test_counts_classes_and_class_sizes_of_real_digits(digits):
    assert digits.num_classes == 10
    assert len(digits) == 1797
    assert digits.class_sizes.sum().item() == 1797
    assert digits.class_sizes.min().item() == 174
    assert digits.class_sizes.max().item() == 183
    assert digits.class_sizes[0].item() == 178  # 178 zeros in the UCI test set


def test_examples_of_returns_exactly_the_examples_of_that_class(digits):
    for c in (0, 7):
        expected = digits.inputs[digits.labels == c]
        assert torch.equal(digits.examples_of(c), expected)
        assert torch.equal(digits.labels[digits.indices_of(c)], torch.full((len(expected),), c))


def test_from_arrays_maps_sorted_distinct_labels_to_classes():
    data = FewShotDataset.from_arrays(np.zeros((5, 3)), np.array([30, 10, 20, 10, 30]))
    assert data.class_names == ["10", "20", "30"]
    assert data.labels.tolist() == [2, 0, 1, 0, 2]
    assert data.inputs.dtype == torch.float32


def test_from_arrays_scales_uint8_images_to_unit_interval():
    images = np.array([[[0, 51]], [[255, 102]]], dtype=np.uint8)
    data = FewShotDataset.from_arrays(images, [0, 1])
    assert data.inputs.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0, 0.4])


def test_subset_classes_relabels_in_given_order_and_keeps_examples(digits):
    part = digits.subset_classes([9, 3])
    assert part.class_names == ["9", "3"]
    assert part.class_sizes.tolist() == [digits.class_sizes[9].item(), digits.class_sizes[3].item()]
    assert torch.equal(part.examples_of(0), digits.examples_of(9))
    assert torch.equal(part.examples_of(1), digits.examples_of(3))


def test_subset_classes_rejects_repeats_and_out_of_range(digits):
    with pytest.raises(ValueError, match="repeated"):
        digits.subset_classes([1, 1])
    with pytest.raises(IndexError, match="class index 10 out of range for 10 classes"):
        digits.subset_classes([10])


def test_mismatched_lengths_raise_naming_both_counts():
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        FewShotDataset(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_float_labels_raise_type_error():
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        FewShotDataset(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))


def test_integer_inputs_raise_type_error():
    with pytest.raises(TypeError, match="inputs must be floating point"):
        FewShotDataset(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0, 1]))


def test_empty_data_set_raises():
    with pytest.raises(ValueError, match="no examples"):
        FewShotDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))


def test_class_without_examples_raises_naming_it():
    with pytest.raises(ValueError, match="class 1 has no examples"):
        FewShotDataset(torch.zeros(2, 2), torch.tensor([0, 2]))


def test_label_beyond_class_names_raises():
    with pytest.raises(ValueError, match="label 2 is out of range for 2 class names"):
        FewShotDataset(torch.zeros(2, 2), torch.tensor([0, 2]), class_names=["a", "b"])
