"""Linear scalarization and Tchebycheff against numbers worked out by hand."""

import pytest
import torch

from peft_panacea.aggregation import AGGREGATION_METHODS, aggregate, linear_scalarization, tchebycheff


def _close(actual: torch.Tensor, expected: float | list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Linear scalarization
# ---------------------------------------------------------------------------------------------------------------------


def test_ls_single_vector():
    """L = 0.25 * 0.6 + 0.75 * 0.2 = 0.15 + 0.15 = 0.3."""
    _close(linear_scalarization(torch.tensor([0.6, 0.2]), torch.tensor([0.25, 0.75])), 0.3)


def test_ls_per_row_preference_is_averaged_over_rows():
    """Row 0: 1 * 1 + 0 * 2 = 1. Row 1: 0.5 * 3 + 0.5 * 4 = 3.5. Mean (1 + 3.5) / 2 = 2.25."""
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    preference = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    _close(linear_scalarization(losses, preference), 2.25)


def test_ls_one_preference_broadcasts_over_rows():
    """Rows 0.5 * (1 + 2) = 1.5 and 0.5 * (3 + 4) = 3.5; mean 2.5."""
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    _close(linear_scalarization(losses, torch.tensor([0.5, 0.5])), 2.5)


def test_ls_batch_losses_with_per_row_preference():
    """Losses (m,) against λ (batch, m): rows 1 * 1 + 0 * 2 = 1 and 0.5 * 1 + 0.5 * 2 = 1.5; mean 1.25."""
    preference = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    _close(linear_scalarization(torch.tensor([1.0, 2.0]), preference), 1.25)


def test_ls_gradient_is_the_preference():
    """dL/dL_i = λ_i: [0.25, 0.75]. Batched over 2 rows, each row's gradient is λ_row / 2."""
    losses = torch.tensor([0.6, 0.2], requires_grad=True)
    linear_scalarization(losses, torch.tensor([0.25, 0.75])).backward()
    _close(losses.grad, [0.25, 0.75])

    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    linear_scalarization(losses, torch.tensor([[1.0, 0.0], [0.5, 0.5]])).backward()
    _close(losses.grad, [[0.5, 0.0], [0.25, 0.25]])


def test_ls_gradient_reaches_parameters_through_losses():
    """L_1 = 2w, L_2 = 3w, λ = (0.4, 0.6): L = 0.8w + 1.8w = 2.6w, so dL/dw = 2.6."""
    weight = torch.tensor(1.0, requires_grad=True)
    losses = torch.stack([2 * weight, 3 * weight])
    linear_scalarization(losses, torch.tensor([0.4, 0.6])).backward()
    _close(weight.grad, 2.6)


# ---------------------------------------------------------------------------------------------------------------------
# Tchebycheff
# ---------------------------------------------------------------------------------------------------------------------


def test_tchebycheff_single_vector():
    """max(0.5 * 0.6, 0.5 * 0.2) = max(0.3, 0.1) = 0.3."""
    _close(tchebycheff(torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5])), 0.3)


def test_tchebycheff_ideal_point_moves_the_maximum():
    """z = (0.5, 0): max(0.5 * (0.6 - 0.5), 0.5 * (0.2 - 0)) = max(0.05, 0.1) = 0.1, from objective 2."""
    losses = torch.tensor([0.6, 0.2], requires_grad=True)
    result = tchebycheff(losses, torch.tensor([0.5, 0.5]), ideal_point=torch.tensor([0.5, 0.0]))
    _close(result, 0.1)

    result.backward()
    _close(losses.grad, [0.0, 0.5])


def test_tchebycheff_scalar_ideal_point():
    """z = 0.1 for both: max(0.5 * 0.5, 0.5 * 0.1) = 0.25."""
    _close(tchebycheff(torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5]), ideal_point=0.1), 0.25)


def test_tchebycheff_gradient_goes_only_to_the_argmax():
    """max(0.3, 0.1) is attained by objective 1, so the gradient is (λ_1, 0) = (0.5, 0)."""
    losses = torch.tensor([0.6, 0.2], requires_grad=True)
    tchebycheff(losses, torch.tensor([0.5, 0.5])).backward()
    _close(losses.grad, [0.5, 0.0])


def test_tchebycheff_per_row():
    """Row 0: max(1 * 1, 0 * 2) = 1 (objective 1). Row 1: max(0.5 * 3, 0.5 * 4) = 2 (objective 2). Mean 1.5.

    Gradient: each row's argmax gets λ / 2 rows: [[0.5, 0], [0, 0.25]].
    """
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    result = tchebycheff(losses, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    _close(result, 1.5)

    result.backward()
    _close(losses.grad, [[0.5, 0.0], [0.0, 0.25]])


def test_tchebycheff_tie_shares_the_gradient():
    """max(0.5 * 0.2, 0.5 * 0.2) = 0.1, attained twice: each objective gets 0.5 / 2 = 0.25."""
    losses = torch.tensor([0.2, 0.2], requires_grad=True)
    result = tchebycheff(losses, torch.tensor([0.5, 0.5]))
    _close(result, 0.1)

    result.backward()
    _close(losses.grad, [0.25, 0.25])


# ---------------------------------------------------------------------------------------------------------------------
# Missing objectives
# ---------------------------------------------------------------------------------------------------------------------


def test_mask_drops_a_missing_objective_from_ls():
    """Objective 2 has no loss (NaN): L = 0.5 * 0.6 = 0.3, its weight is not handed to objective 1."""
    losses = torch.tensor([0.6, float("nan")], requires_grad=True)
    result = linear_scalarization(losses, torch.tensor([0.5, 0.5]), mask=torch.tensor([True, False]))
    _close(result, 0.3)

    result.backward()
    _close(losses.grad, [0.5, 0.0])


def test_mask_per_row_in_tchebycheff():
    """Row 0 has only objective 1: 0.5 * 1 = 0.5. Row 1: max(0.5 * 3, 0.5 * 4) = 2. Mean 1.25.

    Gradient: row 0 -> objective 1 gets 0.5 / 2 = 0.25; row 1 -> objective 2 gets 0.25; the NaN entry gets 0.
    """
    losses = torch.tensor([[1.0, float("nan")], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    result = tchebycheff(losses, torch.tensor([0.5, 0.5]), mask=mask)
    _close(result, 1.25)

    result.backward()
    _close(losses.grad, [[0.25, 0.0], [0.0, 0.25]])


def test_row_with_no_objective_contributes_zero():
    """Row 0 is fully masked: 0. Row 1: LS 0.5 * 3 + 0.5 * 4 = 3.5, Tche max(1.5, 2) = 2. Means 1.75 and 1."""
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[False, False], [True, True]])
    preference = torch.tensor([0.5, 0.5])
    _close(linear_scalarization(losses, preference, mask=mask), 1.75)

    result = tchebycheff(losses, preference, mask=mask)
    _close(result, 1.0)
    result.backward()
    _close(losses.grad, [[0.0, 0.0], [0.0, 0.25]])


def test_mask_gradient_upstream_of_a_placeholder_stays_finite():
    """A missing loss given as a 0 placeholder gets no gradient, so parameters behind it get none: dL/dw = 0.5 * 2."""
    weight = torch.tensor(1.0, requires_grad=True)
    losses = torch.stack([2 * weight, 5 * weight])
    linear_scalarization(losses, torch.tensor([0.5, 0.5]), mask=torch.tensor([True, False])).backward()
    _close(weight.grad, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", AGGREGATION_METHODS)
def test_aggregate_dispatches(method):
    """The dispatcher returns exactly what the named function returns."""
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    preference = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = linear_scalarization(losses, preference) if method == "ls" else tchebycheff(losses, preference)
    _close(aggregate(losses, preference, method), expected.item())


def test_aggregate_passes_the_ideal_point_to_tchebycheff():
    """z = (0.5, 0): max(0.05, 0.1) = 0.1, as in the direct call."""
    result = aggregate(torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5]), "tchebycheff", ideal_point=[0.5, 0.0])
    _close(result, 0.1)


def test_aggregate_rejects_unknown_method():
    with pytest.raises(ValueError, match=r"`method` must be one of \['ls', 'tchebycheff'\], but got 'mean'"):
        aggregate(torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5]), "mean")
    with pytest.raises(TypeError, match="`method` must be a string"):
        aggregate(torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5]), None)


def test_aggregate_rejects_ideal_point_with_ls():
    with pytest.raises(ValueError, match="`ideal_point` only applies to `method='tchebycheff'`"):
        aggregate(torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5]), "ls", ideal_point=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [linear_scalarization, tchebycheff])
def test_wrong_number_of_weights(function):
    with pytest.raises(ValueError, match=r"one weight per objective \(2.*but got shape \(3,\)"):
        function(torch.tensor([0.6, 0.2]), torch.tensor([0.2, 0.3, 0.5]))


@pytest.mark.parametrize("function", [linear_scalarization, tchebycheff])
def test_batch_size_mismatch(function):
    with pytest.raises(ValueError, match=r"same batch size.*\(2, 2\), \(3, 2\)"):
        function(torch.ones(2, 2), torch.full((3, 2), 0.5))


@pytest.mark.parametrize("function", [linear_scalarization, tchebycheff])
def test_unmasked_nan_is_an_error(function):
    with pytest.raises(ValueError, match="NaN for an objective that is not masked out.*pass `mask`"):
        function(torch.tensor([0.6, float("nan")]), torch.tensor([0.5, 0.5]))


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match=r"`losses` must have shape \(m,\) or \(batch, m\).*\(2, 2, 2\)"):
        linear_scalarization(torch.ones(2, 2, 2), torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="`losses` must be a tensor"):
        linear_scalarization([0.6, 0.2], torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="`losses` must be a floating point tensor"):
        linear_scalarization(torch.tensor([1, 2]), torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match=r"`preference` must be a tensor.*torch.tensor"):
        linear_scalarization(torch.tensor([0.6, 0.2]), [0.5, 0.5])
    with pytest.raises(ValueError, match="`preference` must be finite and non-negative"):
        linear_scalarization(torch.tensor([0.6, 0.2]), torch.tensor([1.5, -0.5]))


def test_bad_mask():
    losses, preference = torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5])
    with pytest.raises(TypeError, match="`mask` must be a boolean tensor.*dtype torch.int64"):
        linear_scalarization(losses, preference, mask=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"`mask` must have one entry per objective \(2\).*\(3,\)"):
        linear_scalarization(losses, preference, mask=torch.tensor([True, True, False]))


def test_bad_ideal_point():
    losses, preference = torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match=r"`ideal_point` must be a number, or have shape \(2,\).*\(3,\)"):
        tchebycheff(losses, preference, ideal_point=torch.zeros(3))
    with pytest.raises(ValueError, match="`ideal_point` must be finite"):
        tchebycheff(losses, preference, ideal_point=float("inf"))
    with pytest.raises(TypeError, match="`ideal_point` must be a number, a list of numbers or a tensor"):
        tchebycheff(losses, preference, ideal_point="zero")
    with pytest.raises(ValueError, match="`ideal_point` has 3 rows but the losses have 2"):
        tchebycheff(torch.ones(2, 2), preference, ideal_point=torch.zeros(3, 2))
