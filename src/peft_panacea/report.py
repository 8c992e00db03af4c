"""`report.md` of `panacea demo`: both fronts, the metrics table, answers at several preferences, timings."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .pareto import Front
from .pipeline import STEERING_DESCRIPTION, RunSettings

METHOD_TITLES = {"panacea": "Panacea", "soups": "Rewarded Soups", "rewarded_soups": "Rewarded Soups"}


def _corner_rows(front: Front) -> list[str]:
    """The points at the corners and the centre of the simplex (the grid points nearest to them)."""
    m = len(front.objectives)
    targets = [tuple(1.0 if i == j else 0.0 for i in range(m)) for j in range(m)] + [tuple([1.0 / m] * m)]
    rows = []
    for target in targets:
        point = min(
            front.points,
            key=lambda p: sum((p.preference[name] - t) ** 2 for name, t in zip(front.objectives, target)),
        )
        weights = ", ".join(f"{point.preference[name]:.2f}" for name in front.objectives)
        cells = []
        for name in front.objectives:
            extra = point.extra.get(name, {})
            accuracy = extra.get("accuracy")
            accuracy_text = f" / {accuracy:.3f}" if accuracy is not None else ""
            cells.append(f"{point.scores[name]:+.4f}{accuracy_text}")
        rows.append(f"| {METHOD_TITLES.get(front.method, front.method)} | ({weights}) | " + " | ".join(cells) + " |")
    return rows


def _monotone(front: Front, name: str) -> str:
    """Whether objective `name`'s score rises with its own weight along the grid (Spearman rank correlation)."""
    pairs = sorted((p.preference[name], p.scores[name]) for p in front.points)
    weights = [w for w, _ in pairs]
    scores = [s for _, s in pairs]

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    rw, rs = ranks(weights), ranks(scores)
    n = len(rw)
    mean = (n - 1) / 2
    covariance = sum((a - mean) * (b - mean) for a, b in zip(rw, rs))
    variance = sum((a - mean) ** 2 for a in rw)
    rho = covariance / variance if variance else 0.0
    return f"{rho:+.2f}"


def _slope_text(metrics: Mapping[str, Any], name: str) -> str:
    slope = metrics.get("steering", {}).get("objectives", {}).get(name)
    if slope is None:
        return "n/a"
    stderr = slope["slope_stderr"]
    stderr_text = "n/a" if stderr is None else f"{stderr:.4f}"
    return f"{slope['slope']:+.4f} ± {stderr_text}"


def write_report(
    root: Path,
    settings: RunSettings,
    fronts: Mapping[str, Front],
    metrics: Mapping[str, Mapping[str, Any]],
    answers: Mapping[str, Mapping[str, list[str]]],
    preferences: Sequence[Sequence[float]],
    timings: Mapping[str, float],
    argv: Sequence[str],
    quick: bool = False,
) -> Path:
    """Writes `root/report.md` and returns its path."""
    names = list(settings.objectives)
    any_front = next(iter(fronts.values()))
    lines = [
        "# Panacea vs Rewarded Soups",
        "",
        f"Command: `{shlex.join(argv)}`",
        "",
        *(
            [
                "**A `--quick` smoke run: a few steps and a few held-out pairs. It shows that the pipeline runs; its "
                "numbers are noise.**",
                "",
            ]
            if quick
            else []
        ),
        f"Model: `{settings.model}`. Data: {settings.data_description()}. Objectives: {', '.join(names)}.",
        f"Budget: {settings.steps} steps of {settings.pairs_per_objective} pair(s) per objective for Panacea; "
        f"Rewarded Soups trains one LoRA per objective for {settings.steps // len(names)} steps of the same batch "
        "size (the same number of steps and pairs in all).",
        "",
        f"Score: `{any_front.score_name}`: {any_front.score_description}",
        "",
        "![fronts](front.png)",
        "",
        "## Metrics",
        "",
        "Hypervolume uses one reference point for both methods: "
        + json.dumps(next(iter(metrics.values()))["hypervolume"]["reference_point"])
        + ".",
        "",
        "| method | hypervolume | inner product | sparsity | spacing | knee λ | "
        + " | ".join(f"rank corr. of {name} with its weight" for name in names)
        + " | "
        + " | ".join(f"slope of {name} in its weight (± s.e.)" for name in names)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * (2 * len(names)),
    ]
    for method, front in fronts.items():
        values = metrics[method]
        knee = values["knee_point"]["preference"]
        knee_text = ", ".join(f"{knee[name]:.1f}" for name in names)
        rho = " | ".join(_monotone(front, name) for name in names)
        slopes = " | ".join(_slope_text(values, name) for name in names)
        lines.append(
            f"| {METHOD_TITLES.get(method, method)} | {values['hypervolume']['value']:.4g} | "
            f"{values['inner_product']:.4g} | {values['sparsity']:.4g} | {values['spacing']:.4g} | ({knee_text}) | "
            f"{rho} | {slopes} |"
        )
    lines += ["", "Slope: " + STEERING_DESCRIPTION]

    lines += [
        "",
        "## Corners and centre of the simplex",
        "",
        "Each cell: mean implicit reward margin / preference accuracy on the held-out pairs of that objective.",
        "",
        "| method | λ (" + ", ".join(names) + ") | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for front in fronts.values():
        lines += _corner_rows(front)

    lines += ["", "## Answers at several preferences (greedy)", ""]
    for method in fronts:
        for prompt, replies in answers.get(method, {}).items():
            lines += [f"**{METHOD_TITLES.get(method, method)}**, prompt: {prompt}", ""]
            for preference, reply in zip(preferences, replies):
                weights = ", ".join(f"{name}={weight:g}" for name, weight in zip(names, preference))
                lines.append(f"- λ ({weights}): {' '.join(reply.split())}")
            lines.append("")

    lines += ["## Time", "", "| step | minutes |", "|---|---|"]
    lines += [f"| {step} | {seconds / 60:.1f} |" for step, seconds in timings.items()]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
