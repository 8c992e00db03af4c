"""Loss aggregation for multi-objective training: linear scalarization and Tchebycheff, as pure functions.

Each training step of Panacea computes one loss `L_i` per objective with the λ-conditioned policy and folds them into
the scalar that is back-propagated:

- linear scalarization (LS): `L = sum_i lambda_i L_i`
- Tchebycheff (Tche): `L = max_i lambda_i (L_i - z_i)`, with `z` an ideal point (0 for DPO losses)

Shapes. `losses` is `(m,)` (one loss per objective, already averaged over the batch) or `(batch, m)` (one loss per
row and objective). `preference` is `(m,)` (one λ for the batch) or `(batch, m)` (one λ per row). The two are
broadcast against each other; when either is batched, the per-row aggregate is averaged over the rows.

Missing objectives. An objective may have no loss for a row or a whole batch (e.g. its label is missing). Pass a
boolean `mask` of shape `(m,)` or `(batch, m)`, `True` where the loss is present: a masked-out entry contributes
nothing to the value and receives no gradient, whatever it holds (NaN included). The remaining weights are not
renormalised, so a missing objective does not hand its weight to the others. A NaN in an entry that is not masked
out is an error, never silently dropped.

>>> losses = torch.tensor([0.6, 0.2])
>>> linear_scalarization(losses, torch.tensor([0.5, 0.5]))
tensor(0.4000)
>>> tchebycheff(losses, torch.tensor([0.5, 0.5]))
tensor(0.3000)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

AGGREGATION_METHODS = ("ls", "tchebycheff")
"""The names `aggregate` accepts."""


def linear_scalarization(
    losses: torch.Tensor,
    preference: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of the objective losses, `sum_i lambda_i L_i`.

    The gradient reaches every present objective, scaled by its weight: `dL / dL_i = lambda_i` (divided by the number
    of rows when batched).

    Args:
        losses: Per-objective losses, `(m,)` or `(batch, m)`.
        preference: The preference λ, `(m,)` or `(batch, m)`, non-negative (normally on the simplex).
        mask: Optional booleans, `(m,)` or `(batch, m)`, `True` where a loss is present. Masked-out entries contribute
            nothing and receive no gradient.

    Returns:
        A scalar tensor: the weighted sum, averaged over the rows when `losses`, `preference` or `mask` is batched.

    Raises:
        TypeError: If an argument is not a tensor, `losses` is not floating point or `mask` is not boolean.
        ValueError: If the shapes do not match, `preference` is negative or not finite, or a loss that is not masked
            out is NaN.
    """
    losses, preference, mask = _check_inputs(losses, preference, mask)

    weighted = torch.where(mask, preference * losses, torch.zeros_like(losses))  # (batch, m)
    return weighted.sum(dim=-1).mean()


def tchebycheff(
    losses: torch.Tensor,
    preference: torch.Tensor,
    ideal_point: torch.Tensor | Sequence[float] | float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted Tchebycheff scalarization, `max_i lambda_i (L_i - z_i)`.

    Only the objective that attains the maximum receives gradient, `lambda_i` for it and 0 for the others (divided by
    the number of rows when batched); when several objectives tie for the maximum, the gradient is shared equally
    between them.

    Args:
        losses: Per-objective losses, `(m,)` or `(batch, m)`.
        preference: The preference λ, `(m,)` or `(batch, m)`, non-negative (normally on the simplex).
        ideal_point: The ideal point `z`: one number for every objective, a list or tensor `(m,)`, or a tensor
            `(batch, m)`.
            `None` means `z = 0`, the right choice for DPO losses, which are bounded below by 0.
        mask: Optional booleans, `(m,)` or `(batch, m)`, `True` where a loss is present. The maximum runs over the
            present objectives only; a row with no present objective contributes 0.

    Returns:
        A scalar tensor: the maximum, averaged over the rows when an input is batched.

    Raises:
        TypeError: If an argument is not a tensor (or a number or list of numbers, for `ideal_point`), `losses` is
            not floating point or `mask` is not boolean.
        ValueError: If the shapes do not match, `preference` is negative or not finite, `ideal_point` is not finite,
            or a loss that is not masked out is NaN.
    """
    losses, preference, mask = _check_inputs(losses, preference, mask)
    ideal = _check_ideal_point(ideal_point, losses)

    weighted = preference * (losses - ideal)  # (batch, m)
    weighted = torch.where(mask, weighted, torch.full_like(weighted, -torch.inf))  # (batch, m)
    row_max = torch.amax(weighted, dim=-1)  # (batch,)
    row_max = torch.where(mask.any(dim=-1), row_max, torch.zeros_like(row_max))  # (batch,)
    return row_max.mean()


def aggregate(
    losses: torch.Tensor,
    preference: torch.Tensor,
    method: str,
    ideal_point: torch.Tensor | Sequence[float] | float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregates per-objective losses with the method named by `method`.

    Args:
        losses: Per-objective losses, `(m,)` or `(batch, m)`.
        preference: The preference λ, `(m,)` or `(batch, m)`.
        method: `"ls"` for `linear_scalarization` or `"tchebycheff"` for `tchebycheff`.
        ideal_point: The ideal point of `tchebycheff`; must be `None` for `"ls"`, where it has no effect on the
            gradient.
        mask: Optional booleans, `True` where a loss is present (see the module docstring).

    Returns:
        The aggregated scalar loss.

    Raises:
        ValueError: If `method` is not one of `AGGREGATION_METHODS`, or `ideal_point` is given with `"ls"`; and
            whatever the chosen function raises.
        TypeError: If `method` is not a string; and whatever the chosen function raises.
    """
    if not isinstance(method, str):
        raise TypeError(f"`method` must be a string, one of {list(AGGREGATION_METHODS)}, but got {method!r}.")

    if method == "ls":
        if ideal_point is not None:
            raise ValueError(
                "`ideal_point` only applies to `method='tchebycheff'`; linear scalarization ignores it (it shifts the "
                f"loss by a constant), but got ideal_point={ideal_point!r}. Pass `ideal_point=None`."
            )
        return linear_scalarization(losses, preference, mask=mask)
    if method == "tchebycheff":
        return tchebycheff(losses, preference, ideal_point=ideal_point, mask=mask)
    raise ValueError(f"`method` must be one of {list(AGGREGATION_METHODS)}, but got {method!r}.")


def _check_inputs(
    losses: torch.Tensor,
    preference: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validates the inputs and returns them as `(batch, m)` tensors (`batch` is 1 when nothing is batched)."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"`losses` must be a tensor of shape (m,) or (batch, m), but got {type(losses).__name__}.")
    if not losses.is_floating_point():
        raise TypeError(f"`losses` must be a floating point tensor, but got dtype {losses.dtype}.")
    if not isinstance(preference, torch.Tensor):
        raise TypeError(
            f"`preference` must be a tensor of shape (m,) or (batch, m), but got {type(preference).__name__}. "
            "Convert it with `torch.tensor(...)`."
        )
    _check_rank("losses", losses)
    _check_rank("preference", preference)

    num_objectives = losses.shape[-1]
    if preference.shape[-1] != num_objectives:
        raise ValueError(
            f"`preference` must have one weight per objective ({num_objectives}, the last dimension of `losses`), "
            f"but got shape {tuple(preference.shape)} for losses of shape {tuple(losses.shape)}."
        )
    preference = preference.to(dtype=losses.dtype, device=losses.device)
    if not torch.isfinite(preference).all() or (preference < 0).any():
        raise ValueError(f"`preference` must be finite and non-negative, but got {preference.tolist()}.")

    if mask is None:
        mask = torch.ones(num_objectives, dtype=torch.bool, device=losses.device)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        received = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"`mask` must be a boolean tensor, `True` where a loss is present, but got {received}.")
    else:
        _check_rank("mask", mask)
        if mask.shape[-1] != num_objectives:
            raise ValueError(
                f"`mask` must have one entry per objective ({num_objectives}), but got shape {tuple(mask.shape)}."
            )
        mask = mask.to(device=losses.device)

    batch_sizes = {t.shape[0] for t in (losses, preference, mask) if t.dim() == 2}
    if len(batch_sizes) > 1:
        raise ValueError(
            "`losses`, `preference` and `mask` must have the same batch size where they are batched, but got shapes "
            f"{tuple(losses.shape)}, {tuple(preference.shape)} and {tuple(mask.shape)}. Give one preference per row "
            "of the losses, or a single preference of shape (m,) for the whole batch."
        )
    batch_size = batch_sizes.pop() if batch_sizes else 1

    shape = (batch_size, num_objectives)
    losses, preference, mask = losses.expand(shape), preference.expand(shape), mask.expand(shape)
    if torch.isnan(losses[mask]).any():
        raise ValueError(
            "`losses` holds NaN for an objective that is not masked out. If an objective has no loss in this batch "
            "(e.g. missing labels), pass `mask` with `False` for it."
        )
    return losses, preference, mask


def _check_rank(argument: str, tensor: torch.Tensor) -> None:
    if tensor.dim() not in (1, 2) or tensor.shape[-1] == 0:
        raise ValueError(
            f"`{argument}` must have shape (m,) or (batch, m) with m >= 1, but got shape {tuple(tensor.shape)}."
        )


def _check_ideal_point(ideal_point: Any, losses: torch.Tensor) -> torch.Tensor:
    """Returns the ideal point as a tensor that broadcasts against `losses` `(batch, m)`."""
    if ideal_point is None:
        return torch.zeros((), dtype=losses.dtype, device=losses.device)
    numbers_only = isinstance(ideal_point, (list, tuple)) and all(
        isinstance(value, (int, float)) and not isinstance(value, bool) for value in ideal_point
    )
    if isinstance(ideal_point, bool) or not (isinstance(ideal_point, (int, float, torch.Tensor)) or numbers_only):
        raise TypeError(
            f"`ideal_point` must be a number, a list of numbers or a tensor of shape (m,) or (batch, m), but got "
            f"{type(ideal_point).__name__}: {ideal_point!r}."
        )

    ideal = torch.as_tensor(ideal_point).to(dtype=losses.dtype, device=losses.device)
    if ideal.dim() > 0 and (ideal.dim() > 2 or ideal.shape[-1] != losses.shape[-1]):
        raise ValueError(
            f"`ideal_point` must be a number, or have shape ({losses.shape[-1]},) or (batch, {losses.shape[-1]}), "
            f"but got shape {tuple(ideal.shape)}."
        )
    if ideal.dim() == 2 and ideal.shape[0] != losses.shape[0]:
        raise ValueError(
            f"`ideal_point` has {ideal.shape[0]} rows but the losses have {losses.shape[0]}; give one row per row of "
            "the losses, or a single point of shape (m,)."
        )
    if not torch.isfinite(ideal).all():
        raise ValueError(f"`ideal_point` must be finite, but got {ideal.tolist()}.")
    return ideal
