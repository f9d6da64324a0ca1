"""The kernels feature-major (``[features, n]``) give the row-major kernels' numbers."""

import pytest
import torch

from learned_optim.metalearner import MetaLearnerLSTM
from learned_optim.rule.math import (
    ConstantGrads,
    prepare_step,
    row_scratch,
    rows_backward,
    update_rows,
)

DOUBLE = torch.float64
HIDDEN, WIDTH, ROWS = 20, 42, 37


def _inputs(seed: int = 0):
    torch.manual_seed(seed)
    meta = MetaLearnerLSTM().to(DOUBLE)
    with torch.no_grad():
        for weight in meta.parameters():
            weight.add_(torch.randn_like(weight) * 0.3)
        constants = prepare_step(meta.weights(), torch.tensor(1.6, dtype=DOUBLE), DOUBLE)
    state = torch.randn(ROWS, WIDTH, dtype=DOUBLE) * 0.5
    grad = torch.randn(ROWS, dtype=DOUBLE) * 1e-2
    grad[:3] = torch.tensor([1e-6, -2e-5, 0.0], dtype=DOUBLE)  # the linear branch of pre()
    return constants, state, grad, torch.randn(ROWS, dtype=DOUBLE)


@pytest.mark.parametrize("in_place", [False, True], ids=["new-out", "out-is-state"])
def test_feature_major_forward_equals_row_major(in_place):
    constants, state, grad, param = _inputs()
    with torch.no_grad():
        expected_param, expected_state = update_rows(constants, state, grad, param)
        # A larger scratch than needed, as a chunk loop's last chunk sees it.
        columns = state.t().contiguous()
        out = columns if in_place else torch.empty_like(columns)
        new_param, new_columns = update_rows(
            constants, columns, grad, param, out=out, scratch=row_scratch(ROWS + 5, HIDDEN,
                                                                          dtype=DOUBLE),
            feature_major=True)
    assert new_columns.data_ptr() == out.data_ptr()
    torch.testing.assert_close(new_param, expected_param, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(new_columns.t(), expected_state, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("incoming", ["param", "state", "both"])
def test_feature_major_backward_equals_row_major(incoming):
    constants, state, grad, param = _inputs(1)
    d_param_out = None if incoming == "state" else torch.randn(ROWS, dtype=DOUBLE)
    d_state_out = None if incoming == "param" else torch.randn(ROWS, WIDTH, dtype=DOUBLE)
    results = {}
    with torch.no_grad():
        for feature_major in (False, True):
            rows_in = state.t().contiguous() if feature_major else state
            d_rows_out = (None if d_state_out is None
                          else d_state_out.t().contiguous() if feature_major else d_state_out)
            scratch = row_scratch(ROWS, HIDDEN, dtype=DOUBLE)
            _, new_rows = update_rows(
                constants, rows_in, grad, param, out=torch.empty_like(rows_in),
                scratch=scratch, feature_major=feature_major)
            d_state, d_grad, d_param, dz, d_pre, h1 = rows_backward(
                constants, HIDDEN, scratch, ROWS, rows_in, grad, param, new_rows, d_param_out,
                d_rows_out, (True, True, True), feature_major=feature_major)
            sums = ConstantGrads(constants)
            sums.add(scratch, ROWS, rows_in, param, dz, d_pre, h1, feature_major=feature_major)
            if feature_major:
                d_state = d_state.t()
            results[feature_major] = (d_state, d_grad, d_param,
                                      *sums.result([True] * 6))
    for ours, reference in zip(results[True], results[False]):
        assert reference.abs().max() > 0
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)
