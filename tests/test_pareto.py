"""Preference grids, front metrics on fronts worked out by hand, front.json, plots and the evaluation helpers."""

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_panacea.pareto import (
    FRONT_FORMAT_VERSION,
    Front,
    FrontPoint,
    KneePoint,
    compute_metrics,
    default_reference_point,
    hypervolume,
    inner_product,
    knee_point,
    non_dominated,
    plot_fronts,
    read_front,
    spacing,
    sparsity,
    write_front,
)
from peft_panacea.preference import simplex_grid
from peft_panacea.scoring import evaluate_preference_grid, implicit_reward_scores, sequence_logps, steering_slopes

# Three non-dominated points, unevenly spaced: the running example of the metric tests.
UNEVEN = [[0.0, 3.0], [1.0, 2.0], [3.0, 0.0]]


def _front(method="panacea", objectives=("helpful", "harmless"), scores=((1, 3), (2, 2), (3, 1)), prefs=None):
    prefs = prefs or [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)][: len(scores)]
    points = [
        FrontPoint(dict(zip(objectives, p)), dict(zip(objectives, s)), {objectives[0]: {"accuracy": 0.5}})
        for p, s in zip(prefs, scores)
    ]
    return Front(method=method, objectives=list(objectives), points=points, evaluation={"rows": 8, "seed": 0})


# ---------------------------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------------------------


def test_simplex_grid_two_objectives():
    """Step 0.1 on the segment: (1, 0), (0.9, 0.1), ..., (0, 1), 11 points with exact decimals."""
    grid = simplex_grid(2, 0.1)
    assert len(grid) == 11
    assert grid[0] == (1.0, 0.0) and grid[3] == (0.7, 0.3) and grid[-1] == (0.0, 1.0)


def test_simplex_grid_three_objectives():
    """Step 0.2 on the triangle: C(5 + 2, 2) = 21 distinct points, each summing to 1."""
    grid = simplex_grid(3, 0.2)
    assert len(grid) == 21 == len(set(grid))
    assert all(math.isclose(sum(point), 1.0) and min(point) >= 0 for point in grid)
    assert grid[:3] == [(1.0, 0.0, 0.0), (0.8, 0.2, 0.0), (0.8, 0.0, 0.2)]


def test_simplex_grid_small_cases():
    assert simplex_grid(2, 0.5) == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert simplex_grid(1, 0.25) == [(1.0,)]
    assert simplex_grid(3, 1.0) == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]


def test_simplex_grid_errors():
    with pytest.raises(
        ValueError,
        match=r"`step` \(`--grid-step`\) must divide 1 into a whole number of parts, such as 0.5, .* but got 0.3",
    ):
        simplex_grid(2, 0.3)
    with pytest.raises(ValueError, match=r"`step` must be in \(0, 1\], but got 0"):
        simplex_grid(2, 0)
    with pytest.raises(ValueError, match="`num_objectives` must be at least 1, but got 0"):
        simplex_grid(0, 0.1)
    with pytest.raises(TypeError, match="`num_objectives` must be an integer"):
        simplex_grid(2.0, 0.1)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_non_dominated_with_a_dominated_point_and_a_duplicate():
    """(1, 1) is dominated by (2, 2); the second copy of (2, 2) is not marked again."""
    mask = non_dominated([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]])
    assert mask.tolist() == [True, True, True, False, False]


def test_hypervolume_by_hand():
    """Points (1, 3), (2, 2), (3, 1), reference (0, 0). Slabs along x: [0, 1] x 3 + [1, 2] x 2 + [2, 3] x 1 = 6.

    Adding the dominated (1, 1) changes nothing; a point below the reference, (-1, 5), adds nothing in x.
    """
    points = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(points, [0, 0]) == pytest.approx(6.0)
    assert hypervolume([*points, [1, 1]], [0, 0]) == pytest.approx(6.0)
    assert hypervolume([*points, [-1, 5]], [0, 0]) == pytest.approx(6.0)


def test_hypervolume_uneven_front():
    """Points (0, 3), (1, 2), (3, 0), reference (-1, -1): slabs [-1, 0] x 4 + [0, 1] x 3 + [1, 3] x 1 = 9."""
    assert hypervolume(UNEVEN, [-1, -1]) == pytest.approx(9.0)


def test_hypervolume_three_objectives():
    """Two boxes from the origin: (2, 1, 1) and (1, 2, 1) have volume 2 each and overlap in (1, 1, 1): 2 + 2 - 1."""
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0)


def test_default_reference_point():
    """Min (1, 1), range (2, 2): (1 - 0.2, 1 - 0.2) = (0.8, 0.8). Shifted by 0.8 the points are (0.2, 2.2),
    (1.2, 1.2), (2.2, 0.2): slabs 0.2 x 2.2 + 1 x 1.2 + 1 x 0.2 = 0.44 + 1.2 + 0.2 = 1.84.

    A single point (2, 5) has no range: the margin is 0.1 * |value|, so (1.8, 4.5) and a volume of 0.2 x 0.5.
    """
    points = [[1, 3], [2, 2], [3, 1]]
    np.testing.assert_allclose(default_reference_point(points), [0.8, 0.8])
    assert hypervolume(points) == pytest.approx(1.84)

    np.testing.assert_allclose(default_reference_point([[2, 5]]), [1.8, 4.5])
    assert hypervolume([[2, 5]]) == pytest.approx(0.1)


def test_inner_product_by_hand():
    """<(1, 0), (3, 1)> = 3, <(0.5, 0.5), (2, 2)> = 2, <(0, 1), (1, 3)> = 3; mean 8 / 3."""
    preferences = [[1, 0], [0.5, 0.5], [0, 1]]
    scores = [[3, 1], [2, 2], [1, 3]]
    assert inner_product(preferences, scores) == pytest.approx(8 / 3)


def test_sparsity_by_hand():
    """Objective 1 sorted 0, 1, 3: gaps 1, 2. Objective 2 sorted 0, 2, 3: gaps 2, 1. (1 + 4 + 4 + 1) / (3 - 1) = 5.

    The dominated (0.5, 0.5) is left out; a single point has sparsity 0.
    """
    assert sparsity(UNEVEN) == pytest.approx(5.0)
    assert sparsity([*UNEVEN, [0.5, 0.5]]) == pytest.approx(5.0)
    assert sparsity([[1.0, 1.0]]) == 0.0


def test_spacing_by_hand():
    """L1 distances: d(A, B) = 1 + 1 = 2, d(A, C) = 3 + 3 = 6, d(B, C) = 2 + 2 = 4. Nearest: 2, 2, 4; mean 8 / 3.
    Squared deviations 4/9 + 4/9 + 16/9 = 24/9, over n - 1 = 2: 4/3; spacing sqrt(4/3).

    Evenly spaced (0, 2), (1, 1), (2, 0): every nearest distance is 2, spacing 0.
    """
    assert spacing(UNEVEN) == pytest.approx(math.sqrt(4 / 3))
    assert spacing([[0, 2], [1, 1], [2, 0]]) == pytest.approx(0.0)
    assert spacing([[1.0, 1.0]]) == 0.0


def test_knee_point_two_objectives():
    """Scores (4, 0), (3, 3), (1, 3.5), (0, 4) and the dominated (1, 1); ranges 4 and 4.
    Normalised: (1, 0), (0.75, 0.75), (0.25, 0.875), (0, 1); line y1 + y2 = 1; excesses 0, 0.5, 0.125, 0.
    The knee is point 1.
    """
    preferences = [[1, 0], [0.5, 0.5], [0.2, 0.8], [0, 1], [0.5, 0.5]]
    scores = [[4, 0], [3, 3], [1, 3.5], [0, 4], [1, 1]]
    assert knee_point(preferences, scores) == KneePoint(index=1, preference=(0.5, 0.5), scores=(3.0, 3.0))


def test_knee_point_three_objectives():
    """Vertices e1, e2, e3 span the plane y1 + y2 + y3 = 1; (0.6, 0.6, 0.6) sums to 1.8, beyond it: the knee."""
    scores = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.6, 0.6]]
    preferences = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]]
    assert knee_point(preferences, scores).index == 3


def test_knee_point_degenerate_extremes():
    """(1, 0, 0) and (0, 1, 1): the second is best in objectives 2 and 3, so the extremes span no plane.
    Fallback: the largest sum of normalised scores, 2 against 1, i.e. point 1. One point is its own knee.
    """
    assert knee_point([[1, 0, 0], [0, 0.5, 0.5]], [[1, 0, 0], [0, 1, 1]]).index == 1
    assert knee_point([[1.0, 0.0]], [[2.0, 3.0]]) == KneePoint(0, (1.0, 0.0), (2.0, 3.0))


def test_metric_input_errors():
    with pytest.raises(ValueError, match=r"`points` must be an \(n_points, m\) array.*shape \(3,\)"):
        sparsity([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="`points` must hold finite numbers only"):
        non_dominated([[1.0, float("nan")]])
    with pytest.raises(ValueError, match=r"`reference_point` must hold one finite number per objective \(2\)"):
        hypervolume([[1, 2]], [0, 0, 0])
    with pytest.raises(ValueError, match=r"same shape \(one preference per point\).*\(1, 2\) and \(2, 2\)"):
        inner_product([[1, 0]], [[1, 2], [3, 4]])


def test_compute_metrics():
    """Front (1, 3), (2, 2), (3, 1) at λ = (0, 1), (0.5, 0.5), (1, 0).

    HV with reference (0, 0): 6. Inner products 3, 2, 3: 8/3. Sparsity: gaps 1, 1 in both objectives, 4 / 2 = 2.
    Spacing: nearest L1 distances 2, 2, 2: 0. Knee: normalised (0, 1), (0.5, 0.5), (1, 0) all lie on y1 + y2 = 1,
    a tie, so the first point.
    """
    metrics = compute_metrics(_front(), reference_point={"helpful": 0.0, "harmless": 0.0})

    assert metrics["hypervolume"] == {
        "value": pytest.approx(6.0),
        "reference_point": {"helpful": 0.0, "harmless": 0.0},
        "reference_rule": "given",
    }
    assert metrics["inner_product"] == pytest.approx(8 / 3)
    assert metrics["sparsity"] == pytest.approx(2.0)
    assert metrics["spacing"] == pytest.approx(0.0)
    assert metrics["knee_point"] == {
        "index": 0,
        "preference": {"helpful": 0.0, "harmless": 1.0},
        "scores": {"helpful": 1.0, "harmless": 3.0},
    }
    assert (metrics["num_points"], metrics["num_non_dominated"], metrics["non_dominated_indices"]) == (3, 3, [0, 1, 2])
    assert metrics["method"] == "panacea" and metrics["score"]["name"] == "implicit_reward_margin"
    json.dumps(metrics, allow_nan=False)


def test_compute_metrics_default_reference_point_is_recorded():
    """No reference given: (0.8, 0.8) as in `test_default_reference_point`, hypervolume 1.84; the rule is stated."""
    metrics = compute_metrics(_front())
    assert metrics["hypervolume"]["reference_point"] == pytest.approx({"helpful": 0.8, "harmless": 0.8})
    assert metrics["hypervolume"]["value"] == pytest.approx(1.84)
    assert "min - 0.1 * (max - min)" in metrics["hypervolume"]["reference_rule"]


def test_compute_metrics_rejects_a_reference_point_with_unknown_names():
    with pytest.raises(ValueError, match=r"`reference_point` must name exactly the objectives.*unknown \['honest'\]"):
        compute_metrics(_front(), reference_point={"helpful": 0.0, "honest": 0.0})


# ---------------------------------------------------------------------------------------------------------------------
# front.json
# ---------------------------------------------------------------------------------------------------------------------


def test_front_round_trip(tmp_path):
    front = _front()
    front.points[0].extra["harmless"] = {"margin_stderr": float("nan")}
    path = write_front(tmp_path / "run" / "front.json", front)

    data = json.loads(path.read_text())
    assert list(data) == ["format_version", "method", "objectives", "score", "evaluation", "points"]
    assert data["format_version"] == FRONT_FORMAT_VERSION == 1
    assert data["points"][0] == {
        "preference": {"helpful": 0.0, "harmless": 1.0},
        "scores": {"helpful": 1.0, "harmless": 3.0},
        "extra": {"helpful": {"accuracy": 0.5}, "harmless": {"margin_stderr": None}},
    }

    loaded = read_front(path)
    assert loaded.to_dict() == data
    np.testing.assert_array_equal(loaded.score_array(), [[1, 3], [2, 2], [3, 1]])
    np.testing.assert_array_equal(loaded.preference_array(), [[0, 1], [0.5, 0.5], [1, 0]])


def _write_json(tmp_path, mutate):
    data = _front().to_dict()
    mutate(data)
    path = tmp_path / "front.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format_version=2), r"`format_version` must be 1, but got 2"),
        (lambda d: d.pop("points"), r"missing the fields \['points'\]"),
        (lambda d: d.update(objectives=["a", "a"]), r"`objectives` must be unique"),
        (lambda d: d.update(points=[]), r"`points` must hold at least one"),
        (lambda d: d.update(method=""), r"`method` must be a non-empty string"),
        (lambda d: d["points"][1]["preference"].pop("harmless"), r"`points\[1\].preference` must name exactly"),
        (lambda d: d["points"][2]["scores"].update(helpful="high"), r"`points\[2\].scores.helpful` must be a number"),
        (lambda d: d["points"][0]["scores"].update(helpful=float("inf")), r"`points\[0\].scores.helpful` must be fin"),
        (lambda d: d["points"][0]["preference"].update(helpful=-0.5), r"`points\[0\].preference` must be non-neg"),
        (lambda d: d["points"][0].update(extra=[1]), r"`points\[0\].extra` must be a dict of dicts"),
        (lambda d: d.update(score="margin"), r"`score` must be an object with a `name`"),
    ],
)
def test_read_front_rejects_a_malformed_file(tmp_path, mutate, message):
    path = _write_json(tmp_path, mutate)
    with pytest.raises(ValueError, match=rf"front.json is not a valid front file: .*{message}"):
        read_front(path)


def test_front_rejects_bad_evaluation_settings():
    points = _front().points
    with pytest.raises(TypeError, match="`evaluation` must be JSON-serialisable"):
        Front(method="panacea", objectives=["helpful", "harmless"], points=points, evaluation={"data": object()})
    with pytest.raises(ValueError, match="`evaluation` must hold finite numbers only"):
        Front(method="panacea", objectives=["helpful", "harmless"], points=points, evaluation={"beta": math.nan})


def test_read_front_rejects_non_json(tmp_path):
    path = tmp_path / "front.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid front file: it is not JSON"):
        read_front(path)


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_two_objectives(tmp_path):
    soups = _front(method="rewarded_soups", scores=((0.5, 2.5), (1.0, 1.0), (2.5, 0.5)))
    path = plot_fronts([_front(), soups], tmp_path / "plots" / "front.png", title="Panacea vs soups")
    _assert_png(path)


def test_plot_three_objectives(tmp_path):
    objectives = ("helpful", "harmless", "concise")
    grid = simplex_grid(3, 0.5)
    front = _front(objectives=objectives, prefs=grid, scores=[(p[0], p[1], 1 - p[0]) for p in grid])
    _assert_png(plot_fronts([front], tmp_path / "front3d.png"))


def test_plot_errors(tmp_path):
    with pytest.raises(TypeError, match="`fronts` must be a non-empty list of `Front`"):
        plot_fronts([], tmp_path / "x.png")
    other = _front(objectives=("helpful", "honest"))
    with pytest.raises(ValueError, match="`fronts` must share their objectives and score"):
        plot_fronts([_front(), other], tmp_path / "x.png")
    four = _front(objectives=("a", "b", "c", "d"), prefs=[(1, 0, 0, 0)], scores=[(1, 2, 3, 4)])
    with pytest.raises(ValueError, match="can be plotted for 2 or 3 objectives, but they have 4"):
        plot_fronts([four], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------------------------------


class _FakeSteerable:
    """Scores = the preference itself, so the front is the simplex; records every λ entered."""

    def __init__(self):
        self.current = None
        self.entered = []

    @contextlib.contextmanager
    def preference(self, preference):
        previous, self.current = self.current, list(preference)
        self.entered.append(self.current)
        try:
            yield
        finally:
            self.current = previous

    def score(self):
        helpful, harmless = self.current
        return {"helpful": {"margin": helpful, "accuracy": 1.0}, "harmless": {"margin": 2 * harmless, "count": None}}


def test_evaluate_preference_grid(tmp_path):
    steerable = _FakeSteerable()
    points = evaluate_preference_grid(steerable, simplex_grid(2, 0.5), steerable.score, ["helpful", "harmless"])

    assert steerable.entered == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]] and steerable.current is None
    assert [p.scores for p in points] == [
        {"helpful": 1.0, "harmless": 0.0},
        {"helpful": 0.5, "harmless": 1.0},
        {"helpful": 0.0, "harmless": 2.0},
    ]
    assert points[1].preference == {"helpful": 0.5, "harmless": 0.5}
    assert points[1].extra == {"helpful": {"margin": 0.5, "accuracy": 1.0}, "harmless": {"margin": 1.0, "count": None}}

    front = Front(method="fake", objectives=["helpful", "harmless"], points=points)
    assert read_front(write_front(tmp_path / "front.json", front)).to_dict() == front.to_dict()


def test_evaluate_preference_grid_accepts_tensor_rows():
    steerable = _FakeSteerable()
    grid = torch.tensor([[0.25, 0.75]])
    points = evaluate_preference_grid(steerable, grid, steerable.score, ["helpful", "harmless"], progress=False)
    assert points[0].scores == {"helpful": 0.25, "harmless": 1.5}


def test_evaluate_preference_grid_errors():
    steerable = _FakeSteerable()
    names = ["helpful", "harmless"]
    with pytest.raises(ValueError, match=r"Every `grid` point must have 2 weights.*\[1.0\]"):
        evaluate_preference_grid(steerable, [[1.0]], steerable.score, names, progress=False)
    with pytest.raises(ValueError, match=r"must return the metric 'accuracy' for every objective.*\['harmless'\]"):
        evaluate_preference_grid(steerable, [[1.0, 0.0]], steerable.score, names, False, "accuracy")
    with pytest.raises(TypeError, match="must return {objective: {metric: value}}"):
        evaluate_preference_grid(steerable, [[1.0, 0.0]], lambda: {"helpful": 1.0}, names, progress=False)
    with pytest.raises(TypeError, match="`steerable` must have a context-manager method `preference"):
        evaluate_preference_grid(object(), [[1.0, 0.0]], steerable.score, names, progress=False)


def test_implicit_reward_scores_by_hand():
    """β = 0.5. Chosen rewards 0.5 * ((-1, -2, -3) - (-1.5, -2, -2)) = (0.25, 0, -0.5);
    rejected 0.5 * ((-2, -2, -1) - (-1.5, -2, -2)) = (-0.25, 0, 0.5); margins (0.5, 0, -1).

    Accuracy: wins (1, 0.5 for the tie, 0), mean 0.5; sample std 0.5, standard error 0.5 / sqrt(3).
    Margin: mean -1/6; deviations 2/3, 1/6, -5/6, squares sum 7/6, over 2: 7/12; standard error sqrt(7/12) / sqrt(3).
    """
    scores = implicit_reward_scores(
        torch.tensor([-1.0, -2.0, -3.0]),
        torch.tensor([-2.0, -2.0, -1.0]),
        torch.tensor([-1.5, -2.0, -2.0]),
        torch.tensor([-1.5, -2.0, -2.0]),
        beta=0.5,
    )
    assert scores == pytest.approx(
        {
            "accuracy": 0.5,
            "accuracy_stderr": 0.5 / math.sqrt(3),
            "margin": -1 / 6,
            "margin_stderr": math.sqrt(7 / 12) / math.sqrt(3),
            "num_pairs": 3,
        }
    )


def test_steering_slopes_by_hand():
    """Grid (1, 0), (0.5, 0.5), (0, 1). Helpful weights 1, 0.5, 0 (centred 0.5, 0, -0.5; squares sum 0.5).
    Helpful pair margins (0.3, 0.2, 0.1) -> slope (0.5 * 0.3 - 0.5 * 0.1) / 0.5 = 0.2; (0.5, 0.3, 0.1) -> 0.4.
    Mean 0.3; sample std sqrt(0.02) = 0.1414, standard error 0.1414 / sqrt(2) = 0.1.
    Harmless weights 0, 0.5, 1: margins (0, 0.1, 0.2) -> slope 0.2; (1, 1, 1) -> 0. Mean 0.1, standard error 0.1.
    A single pair has no standard error."""
    grid = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    margins = {
        "helpful": torch.tensor([[0.3, 0.5], [0.2, 0.3], [0.1, 0.1]]),  # (points, pairs)
        "harmless": torch.tensor([[0.0, 1.0], [0.1, 1.0], [0.2, 1.0]]),
    }
    slopes = steering_slopes(grid, margins, ["helpful", "harmless"])
    assert slopes["helpful"] == pytest.approx({"slope": 0.3, "slope_stderr": 0.1, "num_pairs": 2})
    assert slopes["harmless"] == pytest.approx({"slope": 0.1, "slope_stderr": 0.1, "num_pairs": 2})

    single = steering_slopes(grid, {name: values[:, :1] for name, values in margins.items()}, ["helpful", "harmless"])
    assert single["helpful"] == pytest.approx({"slope": 0.2, "slope_stderr": None, "num_pairs": 1})

    with pytest.raises(ValueError, match=r"`preferences` must have shape \(points, 2\)"):
        steering_slopes(grid[:, :1], margins, ["helpful", "harmless"])
    with pytest.raises(ValueError, match=r"`pair_margins\['helpful'\]` must have shape \(3, pairs\)"):
        steering_slopes(grid, {**margins, "helpful": margins["helpful"][:2]}, ["helpful", "harmless"])
    with pytest.raises(ValueError, match="The weight of 'helpful' is the same at every grid point"):
        steering_slopes(
            torch.tensor([[0.5, 0.5], [0.5, 0.5]]), {n: v[:2] for n, v in margins.items()}, ["helpful", "harmless"]
        )


def test_implicit_reward_scores_single_pair_and_errors():
    one = torch.tensor([-1.0])
    scores = implicit_reward_scores(one, one - 1, one, one, beta=0.1)
    assert scores["accuracy"] == 1.0 and scores["margin"] == pytest.approx(0.1)
    assert math.isnan(scores["accuracy_stderr"]) and math.isnan(scores["margin_stderr"])

    with pytest.raises(ValueError, match=r"same shape \(n,\).*'ref_logps_rejected': \(2,\)"):
        implicit_reward_scores(one, one, one, torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="`beta` must be positive and finite, but got 0"):
        implicit_reward_scores(one, one, one, one, beta=0)
    with pytest.raises(TypeError, match="`policy_logps_chosen` must be a tensor"):
        implicit_reward_scores([-1.0], one, one, one, beta=0.1)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_sequence_logps_matches_a_manual_computation(tiny_llama):
    """Row 0 is 6 tokens with completion tokens 3..5; row 1 is 4 tokens, right-padded to 6, completion 2..3.

    Manually: run each row alone, unpadded; token t is scored by log_softmax(logits[t - 1])[ids[t]].
    """
    torch.manual_seed(1)
    ids = [torch.randint(0, 100, (6,)), torch.randint(0, 100, (4,))]
    completion_starts = [3, 2]
    batch = {
        "input_ids": torch.stack([ids[0], torch.cat([ids[1], torch.zeros(2, dtype=torch.long)])]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]),
    }

    expected = []
    with torch.no_grad():
        for row, start in zip(ids, completion_starts):
            logps = tiny_llama(input_ids=row[None]).logits[0].log_softmax(-1)  # (seq, vocab)
            expected.append(sum(logps[t - 1, row[t]] for t in range(start, len(row))))

    result = sequence_logps(tiny_llama, batch)
    assert result.shape == (2,) and result.dtype == torch.float32 and not result.requires_grad
    torch.testing.assert_close(result, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_sequence_logps_ignores_padding_and_the_first_token(tiny_llama):
    """A completion mark on padding or on token 0 (nothing predicts it) counts nothing: the sum stays the same."""
    torch.manual_seed(2)
    input_ids = torch.randint(0, 100, (1, 5))
    base = {"input_ids": input_ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    plain = sequence_logps(tiny_llama, {**base, "completion_mask": torch.tensor([[0, 0, 1, 1, 0]])})
    marked = sequence_logps(tiny_llama, {**base, "completion_mask": torch.tensor([[1, 0, 1, 1, 1]])})
    torch.testing.assert_close(plain, marked)


def test_sequence_logps_errors(tiny_llama):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"missing \['completion_mask'\]"):
        sequence_logps(tiny_llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(ValueError, match=r"same shape \(batch, seq\)"):
        sequence_logps(
            tiny_llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones(1, 3)}
        )
