"""Preference vectors: validation on the probability simplex, names, and samplers.

A preference vector λ weighs the objectives of a Panacea adapter. It lives on the probability simplex: every entry is
non-negative, finite, and the entries sum to 1. It is given either as one vector `(m,)` for a whole batch, or as one
vector per row `(batch, m)`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch

SIMPLEX_TOLERANCE = 1e-4
"""How far the sum of a preference vector may be from 1."""

GRID_TOLERANCE = 1e-9
"""How far `1 / step` may be from a whole number in `simplex_grid`."""

PreferenceLike = Sequence[float] | Mapping[str, float] | torch.Tensor


def validate_preference(
    preference: PreferenceLike,
    num_objectives: int,
    names: Sequence[str] | None = None,
    argument: str = "preference",
) -> torch.Tensor:
    """Turns a user's preference into a float32 tensor on the simplex, or says exactly what is wrong with it.

    Args:
        preference: A list or tuple of `num_objectives` weights, a dict from objective name to weight (every name
            given, no other), a tensor of shape `(num_objectives,)`, or a tensor of shape `(batch, num_objectives)`
            for one preference per row of a batch.
        num_objectives: The number of objectives `m`.
        names: The objective names, needed to read a dict.
        argument: The argument name used in error messages.

    Returns:
        A float32 tensor of shape `(m,)` or `(batch, m)`. The input is never renormalised.

    Raises:
        TypeError: If `preference` is not a sequence, mapping or tensor of numbers.
        ValueError: If it has the wrong length or shape, an unknown or missing objective name, a negative, NaN or
            infinite entry, or if a vector does not sum to 1 within `SIMPLEX_TOLERANCE`.
    """
    if isinstance(preference, Mapping):
        preference = _from_mapping(preference, names, argument)

    if isinstance(preference, torch.Tensor):
        if preference.is_complex() or preference.dtype == torch.bool:
            raise TypeError(f"`{argument}` must hold real numbers, but got a tensor of dtype {preference.dtype}.")
        values = preference.detach().to(dtype=torch.float32, device="cpu")
    elif hasattr(preference, "__array__") and not isinstance(preference, Sequence):
        values = torch.as_tensor(preference).to(torch.float32)
    elif isinstance(preference, (str, bytes)) or not isinstance(preference, Sequence):
        raise TypeError(
            f"`{argument}` must be a list, tuple, dict or tensor of {num_objectives} weights, "
            f"but got {type(preference).__name__}: {preference!r}."
        )
    else:
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in preference):
            raise TypeError(f"`{argument}` must contain numbers only, but got {list(preference)!r}.")
        values = torch.tensor([float(v) for v in preference], dtype=torch.float32)

    if values.dim() not in (1, 2) or values.shape[-1] != num_objectives:
        raise ValueError(
            f"`{argument}` must have shape ({num_objectives},) or (batch, {num_objectives}) for {num_objectives} "
            f"objectives{_names_hint(names)}, but got shape {tuple(values.shape)}."
        )
    if values.dim() == 2 and values.shape[0] == 0:
        raise ValueError(f"`{argument}` has zero rows; give at least one preference vector.")
    if not torch.isfinite(values).all():
        raise ValueError(f"`{argument}` must be finite, but got {values.tolist()}.")
    if (values < 0).any():
        raise ValueError(f"`{argument}` must be non-negative (a point on the simplex), but got {values.tolist()}.")

    sums = values.sum(dim=-1)
    if ((sums - 1.0).abs() > SIMPLEX_TOLERANCE).any():
        raise ValueError(
            f"`{argument}` must sum to 1 (within {SIMPLEX_TOLERANCE}), but its sum is {sums.tolist()} for "
            f"{values.tolist()}. Divide by the sum to normalise it."
        )
    return values


def _from_mapping(preference: Mapping[str, float], names: Sequence[str] | None, argument: str) -> list[float]:
    if not names:
        raise ValueError(
            f"`{argument}` was given as a dict, but this adapter has no `preference_names`. "
            "Pass a list of weights in objective order, or set `preference_names` in the `PanaceaConfig`."
        )
    unknown = sorted(set(preference) - set(names))
    missing = [name for name in names if name not in preference]
    if unknown or missing:
        raise ValueError(
            f"`{argument}` must name every objective of {list(names)} exactly once, but got unknown names "
            f"{unknown} and missing names {missing}."
        )
    return [preference[name] for name in names]


def _names_hint(names: Sequence[str] | None) -> str:
    return f" {list(names)}" if names else ""


def uniform_preference(num_objectives: int) -> torch.Tensor:
    """The centre of the simplex, `(1/m, ..., 1/m)`."""
    return torch.full((num_objectives,), 1.0 / num_objectives)


def preference_to_dict(preference: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """A single preference `(m,)` as `{name: weight}`."""
    return {name: float(weight) for name, weight in zip(names, preference.tolist(), strict=True)}


def simplex_grid(num_objectives: int, step: float) -> list[tuple[float, ...]]:
    """Every point of the probability simplex whose coordinates are multiples of `step`.

    The points come in lexicographic order from the first vertex down, e.g. for two objectives and `step=0.5`:
    `[(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]`. There are `C(1/step + m - 1, m - 1)` of them: 11 for `m = 2, step = 0.1`,
    21 for `m = 3, step = 0.2`. Each coordinate is `k / (1/step)` for a whole `k`, so `0.1` prints as `0.1`.

    Args:
        num_objectives: The number of objectives `m`, at least 1.
        step: The grid step in `(0, 1]`; `1 / step` must be a whole number (0.5, 0.25, 0.2, 0.1, ...).

    Returns:
        The grid points as tuples of `m` floats summing to 1.

    Raises:
        TypeError: If `num_objectives` is not an integer or `step` is not a number.
        ValueError: If `num_objectives < 1`, or `step` is outside `(0, 1]` or does not divide 1 into whole parts.
    """
    if isinstance(num_objectives, bool) or not isinstance(num_objectives, numbers.Integral):
        raise TypeError(f"`num_objectives` must be an integer, but got {type(num_objectives).__name__}.")
    if num_objectives < 1:
        raise ValueError(f"`num_objectives` must be at least 1, but got {num_objectives}.")
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"`step` must be a number, but got {type(step).__name__}.")
    if not 0 < step <= 1:
        raise ValueError(f"`step` must be in (0, 1], but got {step}.")
    divisions = round(1 / step)
    if abs(divisions * step - 1) > GRID_TOLERANCE:
        raise ValueError(
            f"`step` (`--grid-step`) must divide 1 into a whole number of parts, such as 0.5, 0.25, 0.2 or 0.1, "
            f"but got {step} (1 / step = {1 / step:g})."
        )

    def compositions(total: int, parts: int) -> Iterable[tuple[int, ...]]:
        if parts == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    return [tuple(count / divisions for count in counts) for counts in compositions(divisions, num_objectives)]


PREFERENCE_SAMPLINGS = ("dirichlet", "uniform", "vertex_mixture", "grid")


class PreferenceSampler:
    """Draws preference vectors for training, as a pure function of a seed and a step counter.

    The same `(seed, step)` always gives the same vectors, on every process and after resuming from a checkpoint,
    because nothing is carried from one draw to the next.

    Methods:
        - `"dirichlet"`: Dirichlet(`concentration`, ..., `concentration`); 1 is uniform on the simplex, below 1
          favours the corners, above 1 the centre.
        - `"uniform"`: Dirichlet(1).
        - `"vertex_mixture"`: with probability `vertex_probability` a corner of the simplex (one objective alone),
          chosen uniformly, otherwise a Dirichlet(`concentration`) draw.
        - `"grid"`: a point of the grid with step `grid_step`, chosen uniformly.

    Args:
        num_objectives: The number of objectives `m`.
        method: One of `PREFERENCE_SAMPLINGS`.
        concentration: The Dirichlet concentration, positive.
        vertex_probability: For `"vertex_mixture"`, the probability of a corner, in [0, 1].
        grid_step: For `"grid"`, the grid step (1 / step must be an integer).
        seed: The base seed.

    Raises:
        ValueError: For an unknown method or an out-of-range parameter.
    """

    def __init__(
        self,
        num_objectives: int,
        method: str = "dirichlet",
        concentration: float = 1.0,
        vertex_probability: float = 0.2,
        grid_step: float = 0.1,
        seed: int = 0,
    ) -> None:
        if method not in PREFERENCE_SAMPLINGS:
            raise ValueError(f"`preference_sampling` must be one of {PREFERENCE_SAMPLINGS}, but got {method!r}.")
        if not concentration > 0:
            raise ValueError(f"`preference_concentration` must be positive, but got {concentration}.")
        if not 0.0 <= vertex_probability <= 1.0:
            raise ValueError(f"`preference_vertex_probability` must be in [0, 1], but got {vertex_probability}.")
        self.num_objectives = num_objectives
        self.method = method
        self.concentration = 1.0 if method == "uniform" else concentration
        self.vertex_probability = vertex_probability
        self.grid = torch.tensor(simplex_grid(num_objectives, grid_step)) if method == "grid" else None
        self.seed = seed

    def sample(self, step: int, rows: int | None = None) -> torch.Tensor:
        """The preference(s) of draw number `step`: `(m,)`, or `(rows, m)` when `rows` is given."""
        count = 1 if rows is None else rows
        m = self.num_objectives

        # A private generator state per draw: the global random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + step)
            if self.method == "grid":
                points = self.grid[torch.randint(len(self.grid), (count,))]  # (count, m)
            else:
                dirichlet = torch.distributions.Dirichlet(torch.full((m,), self.concentration))
                points = dirichlet.sample((count,))  # (count, m)
                if self.method == "vertex_mixture":
                    corners = torch.eye(m)[torch.randint(m, (count,))]  # (count, m)
                    use_corner = torch.rand(count, 1) < self.vertex_probability  # (count, 1)
                    points = torch.where(use_corner, corners, points)

        return points[0] if rows is None else points
