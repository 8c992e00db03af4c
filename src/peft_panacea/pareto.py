"""Pareto fronts: evaluate a steerable model over a grid of preferences, measure the front, store it, plot it.

A front is what one method (Panacea, Rewarded Soups, ...) achieves over a grid of preference vectors λ: one point per
λ, holding a score per objective. Scores are maximised (higher is better), e.g. the mean implicit DPO reward margin
on held-out preference pairs of each objective.

The front.json format
---------------------

A UTF-8 JSON object, written by `write_front` and read (and validated) by `read_front`::

    {
      "format_version": 1,
      "method": "panacea",
      "objectives": ["helpful", "harmless"],
      "score": {"name": "implicit_reward_margin", "description": "Mean implicit reward margin ..."},
      "evaluation": {"data": "hh-rlhf test", "rows": 64, "seed": 0, "beta": 0.1},
      "points": [
        {
          "preference": {"helpful": 1.0, "harmless": 0.0},
          "scores": {"helpful": 0.42, "harmless": -0.13},
          "extra": {"helpful": {"accuracy": 0.61, "margin": 0.42}, "harmless": {"accuracy": 0.48, "margin": -0.13}}
        }
      ]
    }

- `format_version`: the integer 1. A reader refuses any other version.
- `method`: a non-empty name for the method that produced the front.
- `objectives`: the objective names, unique, in the order of every vector of the front.
- `score`: `name` (non-empty) and `description` (may be empty) of the maximised score stored under `scores`.
- `evaluation`: free-form settings of the evaluation (data, number of rows, seed, β, ...), any JSON object.
- `points`: at least one point; each has `preference` and `scores`, each mapping every objective (and nothing else)
  to a finite number, and an optional `extra` mapping a name (usually an objective) to `{metric: number or null}`.
  Non-finite extra values (e.g. the standard error of a single pair) are written as `null`.

Metrics
-------

All metrics take an `(n_points, m)` array of maximised scores (see each function for its definition):
`hypervolume`, `inner_product`, `sparsity`, `spacing`, `knee_point` and `non_dominated`. `compute_metrics` gathers
them for a `Front`, which is the content of a metrics.json file.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import moocore
import numpy as np

FRONT_FORMAT_VERSION = 1
"""The `format_version` that `write_front` writes and `read_front` accepts."""

DEFAULT_SCORE_NAME = "implicit_reward_margin"
DEFAULT_SCORE_DESCRIPTION = (
    "Mean implicit reward margin beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)) on held-out "
    "preference pairs of each objective; higher is better."
)

DEFAULT_REFERENCE_MARGIN = 0.1
"""Fraction of each objective's range that the default hypervolume reference point lies below the worst score."""


# ---------------------------------------------------------------------------------------------------------------------
# The front and its file
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class FrontPoint:
    """One point of a front: the preference λ it was evaluated at and the scores it reached.

    Args:
        preference: `{objective: weight}`.
        scores: `{objective: score}`, maximised.
        extra: `{name: {metric: value}}`, every metric measured at this λ (usually keyed by objective); a value may
            be `None` where it is undefined.
    """

    preference: dict[str, float]
    scores: dict[str, float]
    extra: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The point as a JSON-ready dict; non-finite extra values become `None`."""
        extra = {
            name: {metric: _finite_or_none(value) for metric, value in metrics.items()}
            for name, metrics in self.extra.items()
        }
        return {"preference": dict(self.preference), "scores": dict(self.scores), "extra": extra}


@dataclass
class Front:
    """A measured Pareto front: one method's scores over a grid of preferences, as stored in front.json.

    Every field is validated on construction; see the module docstring for the file format.

    Args:
        method: The name of the method that produced the front, e.g. `"panacea"` or `"rewarded_soups"`.
        objectives: The objective names, in the order of every vector of the front.
        points: The points, at least one.
        score_name: The name of the maximised score stored in each point's `scores`.
        score_description: What that score is and how it was measured.
        evaluation: The evaluation settings (data, rows, seed, ...), JSON-serialisable.

    Raises:
        TypeError: If a field has the wrong type.
        ValueError: If a field has a wrong value: an empty name, duplicate objectives, no points, a point whose
            `preference` or `scores` does not name exactly the objectives, a negative weight or a non-finite number.
    """

    method: str
    objectives: list[str]
    points: list[FrontPoint]
    score_name: str = DEFAULT_SCORE_NAME
    score_description: str = DEFAULT_SCORE_DESCRIPTION
    evaluation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("method", self.method)
        _check_name("score_name", self.score_name)
        if not isinstance(self.score_description, str):
            raise TypeError(f"`score_description` must be a string, but got {type(self.score_description).__name__}.")

        if isinstance(self.objectives, str) or not isinstance(self.objectives, Sequence):
            raise TypeError(f"`objectives` must be a list of names, but got {self.objectives!r}.")
        self.objectives = list(self.objectives)
        if not self.objectives:
            raise ValueError("`objectives` must name at least one objective, but got an empty list.")
        for index, name in enumerate(self.objectives):
            _check_name(f"objectives[{index}]", name)
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"`objectives` must be unique, but got {self.objectives}.")

        if not isinstance(self.evaluation, Mapping):
            raise TypeError(f"`evaluation` must be a dict of settings, but got {type(self.evaluation).__name__}.")
        try:
            json.dumps(self.evaluation, allow_nan=False)
        except TypeError as error:
            raise TypeError(f"`evaluation` must be JSON-serialisable: {error}.") from error
        except ValueError as error:
            raise ValueError(f"`evaluation` must hold finite numbers only: {error}.") from error

        if isinstance(self.points, str) or not isinstance(self.points, Sequence):
            raise TypeError(f"`points` must be a list of `FrontPoint`, but got {type(self.points).__name__}.")
        if not self.points:
            raise ValueError("`points` must hold at least one `FrontPoint`, but got an empty list.")
        self.points = list(self.points)
        for index, point in enumerate(self.points):
            self._check_point(index, point)

    def _check_point(self, index: int, point: FrontPoint) -> None:
        where = f"points[{index}]"
        if not isinstance(point, FrontPoint):
            raise TypeError(f"`{where}` must be a `FrontPoint`, but got {type(point).__name__}.")

        point.preference = _check_number_map(f"{where}.preference", point.preference, self.objectives)
        if any(weight < 0 for weight in point.preference.values()):
            raise ValueError(f"`{where}.preference` must be non-negative, but got {point.preference}.")
        point.scores = _check_number_map(f"{where}.scores", point.scores, self.objectives)

        if not isinstance(point.extra, Mapping):
            raise TypeError(f"`{where}.extra` must be a dict of dicts, but got {type(point.extra).__name__}.")
        extra = {}
        for name, metrics in point.extra.items():
            _check_name(f"{where}.extra key", name)
            extra[name] = _check_number_map(f"{where}.extra.{name}", metrics, allow_none=True)
        point.extra = extra

    def preference_array(self) -> np.ndarray:
        """The preferences as an `(n_points, m)` array, columns in `objectives` order."""
        return np.array([[point.preference[name] for name in self.objectives] for point in self.points], dtype=float)

    def score_array(self) -> np.ndarray:
        """The scores as an `(n_points, m)` array, columns in `objectives` order."""
        return np.array([[point.scores[name] for name in self.objectives] for point in self.points], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """The front as a JSON-ready dict in the front.json format."""
        return {
            "format_version": FRONT_FORMAT_VERSION,
            "method": self.method,
            "objectives": list(self.objectives),
            "score": {"name": self.score_name, "description": self.score_description},
            "evaluation": dict(self.evaluation),
            "points": [point.to_dict() for point in self.points],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Front:
        """Builds a front from a dict in the front.json format, validating it.

        Raises:
            TypeError: If `data` or one of its fields has the wrong type.
            ValueError: If a field is missing, the format version is not `FRONT_FORMAT_VERSION`, or a value is wrong.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"A front must be a JSON object, but got {type(data).__name__}.")
        missing = [key for key in ("format_version", "method", "objectives", "score", "points") if key not in data]
        if missing:
            raise ValueError(f"The front is missing the fields {missing}; see `peft_panacea.pareto` for the format.")
        if data["format_version"] != FRONT_FORMAT_VERSION:
            raise ValueError(
                f"`format_version` must be {FRONT_FORMAT_VERSION}, but got {data['format_version']!r}. The file was "
                "written by another version of peft-panacea; upgrade the package that reads it."
            )

        score = data["score"]
        if not isinstance(score, Mapping) or "name" not in score:
            raise ValueError(f"`score` must be an object with a `name` and a `description`, but got {score!r}.")
        points = data["points"]
        if not isinstance(points, list):
            raise TypeError(f"`points` must be a list, but got {type(points).__name__}.")
        parsed = []
        for index, point in enumerate(points):
            if not isinstance(point, Mapping) or "preference" not in point or "scores" not in point:
                raise ValueError(f"`points[{index}]` must have `preference` and `scores`, but got {point!r}.")
            parsed.append(FrontPoint(point["preference"], point["scores"], point.get("extra", {})))

        return cls(
            method=data["method"],
            objectives=data["objectives"],
            points=parsed,
            score_name=score["name"],
            score_description=score.get("description", ""),
            evaluation=data.get("evaluation", {}),
        )


def write_front(path: str | Path, front: Front) -> Path:
    """Writes a front to a front.json file (creating its folder), in the format of the module docstring.

    Args:
        path: Where to write.
        front: The front.

    Returns:
        The path written.

    Raises:
        TypeError: If `front` is not a `Front`.
    """
    if not isinstance(front, Front):
        raise TypeError(f"`front` must be a `Front`, but got {type(front).__name__}.")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(front.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_front(path: str | Path) -> Front:
    """Reads and validates a front.json file.

    Args:
        path: The file.

    Returns:
        The front.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not JSON or does not follow the front.json format; the message names the file and
            the faulty field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid front file: it is not JSON ({error}).") from error

    try:
        return Front.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid front file: {error}") from error


def _check_name(argument: str, name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"`{argument}` must be a non-empty string, but got {type(name).__name__}: {name!r}.")
    if not name:
        raise ValueError(f"`{argument}` must be a non-empty string, but got an empty one.")
    return name


def _check_number_map(
    argument: str,
    values: Any,
    keys: Sequence[str] | None = None,
    allow_none: bool = False,
) -> dict[str, float | None]:
    """Checks a `{name: number}` mapping (exactly `keys`, when given) and returns it with float values."""
    if not isinstance(values, Mapping):
        raise TypeError(f"`{argument}` must be a dict from name to number, but got {type(values).__name__}.")
    if keys is not None and set(values) != set(keys):
        raise ValueError(
            f"`{argument}` must name exactly the objectives {list(keys)}, but got {list(values)}: missing "
            f"{[key for key in keys if key not in values]}, unknown {[key for key in values if key not in keys]}."
        )

    checked = {}
    for name in keys if keys is not None else values:
        value = values[name]
        _check_name(f"{argument} key", name)
        if value is None and allow_none:
            checked[name] = None
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{argument}.{name}` must be a number, but got {value!r}.")
        elif not allow_none and not math.isfinite(value):
            raise ValueError(f"`{argument}.{name}` must be finite, but got {value!r}.")
        else:
            checked[name] = float(value)
    return checked


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------------------------
# Front metrics (every score is maximised)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KneePoint:
    """The knee of a front: its index among the points, its preference and its scores."""

    index: int
    preference: tuple[float, ...]
    scores: tuple[float, ...]


def non_dominated(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Which points no other point dominates (every score maximised).

    A point dominates another if it is at least as good in every objective and better in one. Of several identical
    non-dominated points only the first is marked.

    Args:
        points: Scores, `(n_points, m)`.

    Returns:
        A boolean array `(n_points,)`, `True` for the non-dominated points.

    Raises:
        ValueError: If `points` is not a non-empty 2-D array of finite numbers.
    """
    points = _as_points(points, "points")
    return np.asarray(moocore.is_nondominated(-points), dtype=bool)  # moocore minimises


def default_reference_point(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The hypervolume reference point used when none is given.

    For each objective: the worst (lowest) score minus `DEFAULT_REFERENCE_MARGIN` times the range of the scores, so
    that every point, the extreme ones included, adds volume. Where all scores of an objective are equal, the margin
    is `DEFAULT_REFERENCE_MARGIN * max(|score|, 1)`. To compare several fronts, compute it once on all their points
    stacked together and pass it to each.

    Args:
        points: Scores, `(n_points, m)`.

    Returns:
        The reference point, `(m,)`.

    Raises:
        ValueError: If `points` is not a non-empty 2-D array of finite numbers.
    """
    points = _as_points(points, "points")

    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high > low, high - low, np.maximum(np.abs(low), 1.0))
    return low - DEFAULT_REFERENCE_MARGIN * span


def hypervolume(
    points: np.ndarray | Sequence[Sequence[float]],
    reference_point: np.ndarray | Sequence[float] | None = None,
) -> float:
    """The hypervolume of a front: the volume of the region that its points dominate, bounded by a reference point.

    `HV = vol(union over points y of the box [r, y])`, every score maximised. Points that do not exceed `r` in every
    objective add nothing. Larger is better. Computed by `moocore.hypervolume` on the negated scores.

    Args:
        points: Scores, `(n_points, m)`.
        reference_point: `r`, `(m,)`; it should be worse than every point. `None` uses `default_reference_point`;
            record the point used (as `compute_metrics` does), since the hypervolume means nothing without it.

    Returns:
        The hypervolume.

    Raises:
        ValueError: If `points` is not a non-empty 2-D array of finite numbers, or `reference_point` does not hold
            one finite number per objective.
    """
    points = _as_points(points, "points")
    reference = _reference_point(reference_point, points)

    return float(moocore.hypervolume(-points, ref=-reference))


def inner_product(
    preferences: np.ndarray | Sequence[Sequence[float]],
    scores: np.ndarray | Sequence[Sequence[float]],
) -> float:
    """How well the points follow their preferences: the mean inner product of each λ with the scores it reached.

    `IP = (1 / n) * sum_k <lambda_k, y_k>`, as in the Panacea paper. Larger is better: a model that puts more of a
    score where the preference puts more weight scores higher. The value depends on the scale of the scores, so only
    compare fronts measured with the same score.

    Args:
        preferences: The preferences, `(n_points, m)`.
        scores: The scores reached at them, `(n_points, m)`.

    Returns:
        The mean inner product.

    Raises:
        ValueError: If either is not a non-empty 2-D array of finite numbers, or their shapes differ.
    """
    preferences, scores = _as_pair(preferences, scores)
    return float(np.mean(np.sum(preferences * scores, axis=1)))


def sparsity(points: np.ndarray | Sequence[Sequence[float]]) -> float:
    """How sparse the non-dominated points are: the mean squared gap between neighbours, objective by objective.

    `SP = 1 / (K - 1) * sum_j sum_{i=1}^{K-1} (P_j(i + 1) - P_j(i))^2` over the `K` non-dominated points, where
    `P_j(i)` is the `i`-th smallest score of objective `j` among them (Xu et al., 2020, "Prediction-Guided
    Multi-Objective Reinforcement Learning"). In two objectives this is the mean squared Euclidean distance between
    consecutive points along the front. Smaller is better (a denser front); it is 0 for fewer than two
    non-dominated points, so read it together with their number.

    Args:
        points: Scores, `(n_points, m)`.

    Returns:
        The sparsity.

    Raises:
        ValueError: If `points` is not a non-empty 2-D array of finite numbers.
    """
    front = _front_of(points)
    if len(front) < 2:
        return 0.0

    gaps = np.diff(np.sort(front, axis=0), axis=0)  # (K - 1, m)
    return float(np.sum(gaps**2) / (len(front) - 1))


def spacing(points: np.ndarray | Sequence[Sequence[float]]) -> float:
    """How evenly the non-dominated points are spread: Schott's spacing.

    `S = sqrt(1 / (K - 1) * sum_i (d_mean - d_i)^2)` with `d_i = min_{k != i} sum_j |y_ij - y_kj|`, the L1
    distance from non-dominated point `i` to its nearest neighbour, and `d_mean` the mean of the `d_i` over the `K`
    non-dominated points (Schott, 1995). 0 means evenly spaced; it is 0 for fewer than two non-dominated points.

    Args:
        points: Scores, `(n_points, m)`.

    Returns:
        The spacing.

    Raises:
        ValueError: If `points` is not a non-empty 2-D array of finite numbers.
    """
    front = _front_of(points)
    if len(front) < 2:
        return 0.0

    distances = np.abs(front[:, None, :] - front[None, :, :]).sum(axis=-1)  # (K, K)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.min(axis=1)  # (K,)
    return float(np.std(nearest, ddof=1))


def knee_point(
    preferences: np.ndarray | Sequence[Sequence[float]],
    points: np.ndarray | Sequence[Sequence[float]],
) -> KneePoint:
    """The knee of the front: the non-dominated point that bulges furthest beyond the plane of the extreme points.

    The non-dominated scores are normalised to `[0, 1]` per objective (min-max over the non-dominated points). The
    extreme points are, for each objective, the non-dominated point best in it; the knee is the point with the
    largest signed distance to the hyperplane through them, on the side of better scores. In two objectives that
    plane is the line `y_1 + y_2 = 1` between the two ends of the front. If the extreme points do not span a
    hyperplane (fewer distinct extremes than objectives), the plane `sum_j y_j = const` is used instead, i.e. the
    knee maximises the sum of normalised scores. Ties go to the first point.

    Args:
        preferences: The preferences, `(n_points, m)`.
        points: Their scores, `(n_points, m)`.

    Returns:
        The knee's index in `points`, its preference and its scores.

    Raises:
        ValueError: If either is not a non-empty 2-D array of finite numbers, or their shapes differ.
    """
    preferences, points = _as_pair(preferences, points)
    candidates = np.flatnonzero(non_dominated(points))
    front = points[candidates]  # (K, m)

    low, high = front.min(axis=0), front.max(axis=0)
    normalised = (front - low) / np.where(high > low, high - low, 1.0)  # (K, m)
    extremes = normalised[np.argmax(normalised, axis=0)]  # (m, m): row j is the point best in objective j
    normal = np.ones(points.shape[1])
    if np.linalg.matrix_rank(extremes) == points.shape[1]:
        normal = np.linalg.solve(extremes, np.ones(points.shape[1]))  # the plane {y : normal . y = 1}
    distance = (normalised @ normal - 1.0) / np.linalg.norm(normal)  # (K,)

    index = int(candidates[np.argmax(distance)])
    return KneePoint(index=index, preference=tuple(preferences[index].tolist()), scores=tuple(points[index].tolist()))


def compute_metrics(
    front: Front,
    reference_point: np.ndarray | Sequence[float] | Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Every metric of a front, as the JSON-ready content of a metrics.json file.

    Args:
        front: The front.
        reference_point: The hypervolume reference point: one number per objective in `front.objectives` order, or
            a dict by objective name. `None` uses `default_reference_point` of this front's scores; pass a shared
            one to compare several fronts.

    Returns:
        `{"method", "objectives", "score", "num_points", "num_non_dominated", "non_dominated_indices",
        "hypervolume": {"value", "reference_point": {objective: value}, "reference_rule"}, "inner_product",
        "sparsity", "spacing", "knee_point": {"index", "preference": {objective: weight},
        "scores": {objective: score}}}`.

    Raises:
        TypeError: If `front` is not a `Front`.
        ValueError: If `reference_point` does not give one finite number per objective.
    """
    if not isinstance(front, Front):
        raise TypeError(f"`front` must be a `Front`, but got {type(front).__name__}.")

    preferences, scores = front.preference_array(), front.score_array()
    rule = "given"
    if reference_point is None:
        reference_point = default_reference_point(scores)
        rule = (
            f"per objective over this front's scores: min - {DEFAULT_REFERENCE_MARGIN} * (max - min), or "
            f"min - {DEFAULT_REFERENCE_MARGIN} * max(|min|, 1) where max == min"
        )
    elif isinstance(reference_point, Mapping):
        reference_point = _check_number_map("reference_point", reference_point, front.objectives)
        reference_point = [reference_point[name] for name in front.objectives]
    reference = _reference_point(reference_point, scores)

    mask = non_dominated(scores)
    knee = knee_point(preferences, scores)
    return {
        "method": front.method,
        "objectives": list(front.objectives),
        "score": {"name": front.score_name, "description": front.score_description},
        "num_points": len(front.points),
        "num_non_dominated": int(mask.sum()),
        "non_dominated_indices": np.flatnonzero(mask).tolist(),
        "hypervolume": {
            "value": hypervolume(scores, reference),
            "reference_point": dict(zip(front.objectives, reference.tolist())),
            "reference_rule": rule,
        },
        "inner_product": inner_product(preferences, scores),
        "sparsity": sparsity(scores),
        "spacing": spacing(scores),
        "knee_point": {
            "index": knee.index,
            "preference": dict(zip(front.objectives, knee.preference)),
            "scores": dict(zip(front.objectives, knee.scores)),
        },
    }


def _as_points(points: Any, argument: str) -> np.ndarray:
    try:
        array = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{argument}` must be an (n_points, m) array of numbers: {error}.") from error
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"`{argument}` must be an (n_points, m) array with at least one point and one objective, but got shape "
            f"{array.shape}."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"`{argument}` must hold finite numbers only, but got {array.tolist()}.")
    return array


def _as_pair(preferences: Any, points: Any) -> tuple[np.ndarray, np.ndarray]:
    preferences, points = _as_points(preferences, "preferences"), _as_points(points, "scores")
    if preferences.shape != points.shape:
        raise ValueError(
            f"`preferences` and the scores must have the same shape (one preference per point), but got "
            f"{preferences.shape} and {points.shape}."
        )
    return preferences, points


def _front_of(points: Any) -> np.ndarray:
    points = _as_points(points, "points")
    return points[non_dominated(points)]


def _reference_point(reference_point: Any, points: np.ndarray) -> np.ndarray:
    if reference_point is None:
        return default_reference_point(points)

    reference = np.asarray(reference_point, dtype=float)
    if reference.shape != (points.shape[1],) or not np.isfinite(reference).all():
        raise ValueError(
            f"`reference_point` must hold one finite number per objective ({points.shape[1]}), but got "
            f"{reference.tolist()}."
        )
    return reference


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def plot_fronts(fronts: Sequence[Front], path: str | Path, title: str | None = None) -> Path:
    """Plots one or more fronts over the same objectives to a PNG (matplotlib, Agg backend, no display).

    Two objectives: one scatter-and-line per method, the points joined in order of the first objective's weight and
    each annotated with that weight. Three objectives: a 3-D scatter per method. Non-dominated points are drawn
    filled, dominated ones hollow. Axes are labelled `objective (score name)`.

    Args:
        fronts: The fronts, all with the same objectives (same order) and the same score.
        path: Where to write the PNG (its folder is created).
        title: The figure title; by default `"Pareto fronts (<score name>)"`.

    Returns:
        The path written.

    Raises:
        TypeError: If `fronts` is not a non-empty list of `Front`.
        ValueError: If the fronts differ in objectives or score, or do not have 2 or 3 objectives.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(fronts, Front) or not isinstance(fronts, Sequence) or not fronts:
        raise TypeError(f"`fronts` must be a non-empty list of `Front`, but got {fronts!r}.")
    if not all(isinstance(front, Front) for front in fronts):
        raise TypeError(f"`fronts` must hold `Front` objects only, but got {[type(f).__name__ for f in fronts]}.")
    objectives, score_name = fronts[0].objectives, fronts[0].score_name
    for front in fronts[1:]:
        if front.objectives != objectives or front.score_name != score_name:
            raise ValueError(
                "`fronts` must share their objectives and score to be drawn on the same axes, but "
                f"{fronts[0].method!r} has {objectives} scored by {score_name!r} and {front.method!r} has "
                f"{front.objectives} scored by {front.score_name!r}."
            )
    if len(objectives) not in (2, 3):
        raise ValueError(
            f"`fronts` can be plotted for 2 or 3 objectives, but they have {len(objectives)}: {objectives}. "
            "Plot pairs of objectives from sub-fronts instead."
        )

    figure = Figure(figsize=(6.4, 5.2), dpi=120)
    FigureCanvasAgg(figure)
    if len(objectives) == 2:
        axes = figure.add_subplot()
    else:
        import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3-D projection)

        axes = figure.add_subplot(projection="3d")
        axes.set_box_aspect(None, zoom=0.9)  # leaves room for the two-line axis labels

    for index, front in enumerate(fronts):
        _plot_front(axes, front, color=f"C{index}")

    if len(objectives) == 2:
        axes.set_xlabel(f"{objectives[0]} ({score_name})")
        axes.set_ylabel(f"{objectives[1]} ({score_name})")
        axes.grid(alpha=0.3)
    else:
        axes.set_xlabel(f"{objectives[0]}\n({score_name})", labelpad=12)
        axes.set_ylabel(f"{objectives[1]}\n({score_name})", labelpad=12)
        axes.set_zlabel(f"{objectives[2]}\n({score_name})", labelpad=12)
    axes.legend(title=f"λ annotation: {objectives[0]}" if len(objectives) == 2 else None, fontsize="small")
    axes.set_title(title if title is not None else f"Pareto fronts ({score_name})")
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _plot_front(axes: Any, front: Front, color: str) -> None:
    preferences, scores = front.preference_array(), front.score_array()
    dominated = ~non_dominated(scores)
    order = np.argsort(-preferences[:, 0], kind="stable")
    columns = [scores[:, j] for j in range(scores.shape[1])]

    if scores.shape[1] == 2:
        axes.plot(*[column[order] for column in columns], color=color, alpha=0.6, label=front.method)
        for k in range(len(scores)):
            axes.annotate(
                f"{preferences[k, 0]:.2g}", (scores[k, 0], scores[k, 1]), xytext=(4, 4), textcoords="offset points",
                fontsize=7, color=color,
            )  # fmt: skip
    else:
        axes.scatter([], [], [], color=color, label=front.method)
    for hollow in (False, True):
        selected = dominated == hollow
        axes.scatter(
            *[column[selected] for column in columns],
            facecolors="none" if hollow else color,
            edgecolors=color,
            s=28,
        )
