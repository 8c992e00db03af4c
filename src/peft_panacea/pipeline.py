"""The steps of the `panacea` command: data, training (Panacea and Rewarded Soups), fronts, answers and the report.

Every step reads and writes a run folder:

```
RUN/
  run.json              the method, every setting, the data used, timings
  adapter/              the Panacea adapter (PEFT `save_pretrained`; its model card lists the objectives and front)
  adapters/<objective>/ Rewarded Soups: one LoRA adapter per objective
  checkpoints/          trainer checkpoints; an interrupted run resumes from the last one
  front.json metrics.json front.png
```
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import PanaceaConfig
from .data import demo_data_dir, label_conciseness, layout1_to_pairs, read_hh_rlhf, split_by_conversation
from .models import load_model_and_tokenizer
from .pareto import Front, compute_metrics, plot_fronts, write_front
from .preference import simplex_grid, validate_preference
from .scoring import PairScorer, evaluate_preference_grid, steering_slopes
from .soups import RewardedSoup

RUN_FILE = "run.json"
ADAPTER_FOLDER = "adapter"
SOUP_FOLDER = "adapters"
CHECKPOINT_FOLDER = "checkpoints"
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
HH_SUBSETS = {"helpful": "helpful-base", "harmless": "harmless-base"}
KNOWN_OBJECTIVES = ("helpful", "harmless", "concise")
SCORE_NAME = "implicit_reward_margin"
SCORE_DESCRIPTION = (
    "Mean implicit DPO reward margin beta * (log-ratio(chosen) - log-ratio(rejected)) on held-out pairs of each "
    "objective, the log-ratios taken against the base model; higher is better. The preference accuracy (share of "
    "pairs with a positive margin) is under `extra`."
)
STEERING_DESCRIPTION = (
    "Per objective: the least-squares slope of each held-out pair's margin against the objective's own weight over "
    "the grid, averaged over the pairs, with its standard error over the pairs (paired: every pair is scored at "
    "every λ). A positive slope several standard errors from 0 means λ steers that objective."
)


# --- settings -----------------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """Everything a run needs, as stored in `run.json`; the CLI fills it from its arguments."""

    model: str = "smollm2-135m"
    objectives: list[str] = field(default_factory=lambda: ["helpful", "harmless"])
    data_dir: str | None = None
    dataset: str | None = None
    split: str = "test"
    eval_fraction: float = 0.1
    eval_pairs: int = 48
    seed: int = 0
    max_prompt_length: int = 64
    max_completion_length: int = 64
    rank: int = 8
    lora_alpha: float = 256.0
    soup_lora_alpha: float = 16.0
    init_std: float = 0.02
    target_modules: str = ALL_PROJECTIONS
    top_layers: int = 10
    steps: int = 150
    pairs_per_objective: int = 2
    learning_rate: float = 2e-3
    beta: float = 0.1
    aggregation: str = "ls"
    preference_sampling: str = "dirichlet"
    save_steps: int = 25
    grid_step: float | None = None

    def __post_init__(self) -> None:
        unknown = [name for name in self.objectives if name not in KNOWN_OBJECTIVES]
        if unknown or len(self.objectives) < 2 or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(
                f"`objectives` must be at least two distinct names among {list(KNOWN_OBJECTIVES)} (a front needs "
                f"two), but got {self.objectives}."
            )
        if self.data_dir is not None and self.dataset is not None:
            raise ValueError("Give `--data-dir` (a local folder) or `--dataset` (a Hub id), not both.")
        for name in ("eval_pairs", "steps", "pairs_per_objective", "rank", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, but got {getattr(self, name)}.")
        if self.top_layers < 0:
            raise ValueError(f"`top_layers` must be 0 (every layer) or positive, but got {self.top_layers}.")
        self.grid  # noqa: B018 - a bad `grid_step` fails here, before any training

    @property
    def grid(self) -> list[tuple[float, ...]]:
        step = self.grid_step if self.grid_step is not None else (0.1 if len(self.objectives) <= 2 else 0.2)
        return simplex_grid(len(self.objectives), step)

    def data_source(self) -> str:
        return self.data_dir or self.dataset or str(demo_data_dir())

    def data_description(self) -> str:
        if self.data_dir:
            return f"HH-RLHF from the local folder {self.data_dir} (split {self.split!r})"
        if self.dataset:
            return f"HH-RLHF from the Hub dataset {self.dataset} (split {self.split!r})"
        return "the HH-RLHF sample embedded in peft-panacea (600 pairs each of helpful-base and harmless-base)"


def save_run(run_dir: Path, method: str, settings: RunSettings, **extra: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"method": method, "settings": asdict(settings), **extra}
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_run(run_dir: str | os.PathLike) -> tuple[str, RunSettings, dict[str, Any]]:
    """Reads `run.json`: `(method, settings, the whole record)`.

    Raises:
        FileNotFoundError: If `run_dir` holds no `run.json` (it is not a finished `panacea dpo` or `soups` run).
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        inside = sorted(str(child.parent) for child in Path(run_dir).glob(f"*/{RUN_FILE}"))
        hint = f" It holds the run folders {inside} (a `panacea demo` folder)." if inside else ""
        raise FileNotFoundError(
            f"`{run_dir}` is not a run folder: it has no {RUN_FILE}. Pass the `--output-dir` of a `panacea dpo` or "
            f"`panacea soups` run.{hint}"
        )
    try:
        record = json.loads(path.read_text())
        return record["method"], RunSettings(**record["settings"]), record
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"`{path}` is not a valid run record ({type(error).__name__}: {error}). It is written by `panacea dpo` "
            "and `panacea soups`; train again into a new `--output-dir`."
        ) from error


def start_run(run_dir: Path, method: str, settings: RunSettings) -> dict[str, Any] | None:
    """Claims `run_dir` for a training run; returns the finished run's record when there is nothing left to train.

    A new folder gets `run.json` with the settings before training starts. A folder holding the same method with the
    same training settings is resumed from its last checkpoint, or left alone when finished. Anything else is
    refused, so that a run folder always holds one run (the grid step is not a training setting and may differ).

    Raises:
        ValueError: If `run_dir` holds a run of another method or with other training settings.
    """
    if (run_dir / RUN_FILE).is_file():
        previous_method, previous, record = load_run(run_dir)
        changed = {
            name: (value, getattr(settings, name))
            for name, value in asdict(previous).items()
            if name != "grid_step" and value != getattr(settings, name)
        }
        if previous_method != method or changed:
            what = f"a {previous_method} run" if previous_method != method else "a run with other settings"
            details = "; ".join(f"{name}: {old!r} there, {new!r} now" for name, (old, new) in changed.items())
            raise ValueError(
                f"`{run_dir}` already holds {what}{f' ({details})' if details else ''}. Pass a new `--output-dir`, "
                "or delete the folder to start again."
            )
        if "train_seconds" in record:
            warnings.warn(
                f"`{run_dir}` holds a finished {method} run with these settings; it is not trained again.",
                UserWarning,
                stacklevel=2,
            )
            return record
    save_run(run_dir, method, settings)
    return None


# --- data ---------------------------------------------------------------------------------------------------------


def load_pairs(settings: RunSettings) -> tuple[dict[str, Dataset], dict[str, Dataset]]:
    """Train and held-out pairs per objective, in TRL's `prompt`, `chosen`, `rejected` form.

    `helpful` and `harmless` read HH-RLHF's helpful-base and harmless-base. `concise` relabels the helpful-base pairs
    by the rule of `label_conciseness` (the shorter final reply wins, ties dropped). The split is by conversation and
    seeded, the same for every objective: no conversation is in both train and eval.
    """
    source = settings.data_source()
    raw: dict[str, Dataset] = {}
    for name in {{"concise": "helpful"}.get(name, name) for name in settings.objectives}:
        raw[name] = read_hh_rlhf(source, split=settings.split, subsets=[HH_SUBSETS[name]])

    train, held_out = {}, {}
    for name in settings.objectives:
        if name == "concise":
            labelled = label_conciseness(raw["helpful"], preference_column="helpful_response_id", seed=settings.seed)
            pairs = layout1_to_pairs(labelled, "concise_response_id")
        else:
            pairs = raw[name]
        train_part, eval_part = split_by_conversation(pairs, settings.eval_fraction, seed=settings.seed)
        train[name] = train_part.select_columns(["prompt", "chosen", "rejected"])
        held_out[name] = eval_part.select_columns(["prompt", "chosen", "rejected"]).select(
            range(min(settings.eval_pairs, len(eval_part)))
        )
    return train, held_out


# --- training -----------------------------------------------------------------------------------------------------


def _layers_to_transform(model: PreTrainedModel, top_layers: int) -> list[int] | None:
    num_layers = model.config.get_text_config().num_hidden_layers
    if top_layers == 0 or top_layers >= num_layers:
        return None
    return list(range(num_layers - top_layers, num_layers))


def _adapter_placement(settings: RunSettings, model: PreTrainedModel) -> dict[str, Any]:
    layers = _layers_to_transform(model, settings.top_layers)
    return {
        "target_modules": settings.target_modules.split(","),
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
    }


def panacea_config(settings: RunSettings, model: PreTrainedModel) -> PanaceaConfig:
    return PanaceaConfig(
        r=settings.rank,
        preference_dim=len(settings.objectives),
        preference_names=list(settings.objectives),
        lora_alpha=settings.lora_alpha,
        init_std=settings.init_std,
        task_type="CAUSAL_LM",
        **_adapter_placement(settings, model),
    )


def _trainer_arguments(settings: RunSettings, output_dir: Path, steps: int, batch_size: int) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "constant",
        "beta": settings.beta,
        "max_length": None,
        "max_prompt_length": settings.max_prompt_length,
        "max_completion_length": settings.max_completion_length,
        "logging_steps": max(1, min(10, steps // 10)),
        "save_steps": settings.save_steps,
        "save_total_limit": 1,
        "report_to": [],
        "seed": settings.seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }


def _last_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(path.name.startswith("checkpoint-") for path in folder.iterdir())


def train_panacea(settings: RunSettings, run_dir: Path) -> dict[str, Any]:
    """Trains a Panacea adapter with multi-objective DPO and saves it to `RUN/adapter`; resumes a checkpoint."""
    from .trainers import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer

    finished = start_run(run_dir, "panacea", settings)
    if finished is not None:
        return {"train_seconds": finished["train_seconds"], "skipped": True}
    started = time.time()
    model, tokenizer = load_model_and_tokenizer(settings.model)
    train, _ = load_pairs(settings)
    checkpoints = run_dir / CHECKPOINT_FOLDER
    args = MultiObjectiveDPOConfig(
        objectives=list(settings.objectives),
        aggregation=settings.aggregation,
        preference_sampling=settings.preference_sampling,
        **_trainer_arguments(
            settings, checkpoints, settings.steps, settings.pairs_per_objective * len(settings.objectives)
        ),
    )
    trainer = MultiObjectiveDPOTrainer(
        model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=panacea_config(settings, model),
    )
    trainer.train(resume_from_checkpoint=_last_checkpoint(checkpoints) or None)
    trainer.model.save_pretrained(run_dir / ADAPTER_FOLDER)
    seconds = time.time() - started
    save_run(run_dir, "panacea", settings, train_seconds=seconds, log_history=trainer.state.log_history)
    return {"train_seconds": seconds}


def train_soups(settings: RunSettings, run_dir: Path) -> dict[str, Any]:
    """Trains one LoRA adapter per objective with TRL's DPO loss, on the same data and total step budget.

    The trainer is `SharedLayersDPOTrainer`, TRL's `DPOTrainer` with the frozen lower layers run once per step, as
    Panacea's trainer does: both methods pay the same per-step cost.

    Panacea takes `steps` steps of `pairs_per_objective * m` pairs; each of the `m` soup adapters takes `steps / m`
    steps of the same batch size, on its own objective's pairs: the same number of steps and pairs in all.
    """
    from trl import DPOConfig

    from .trainers.dpo import SharedLayersDPOTrainer, truncate_tokenized

    finished = start_run(run_dir, "rewarded_soups", settings)
    if finished is not None:
        return {"train_seconds": finished["train_seconds"], "skipped": True}
    started = time.time()
    train, _ = load_pairs(settings)
    steps = max(1, settings.steps // len(settings.objectives))
    batch_size = settings.pairs_per_objective * len(settings.objectives)
    logs = {}
    for name in settings.objectives:
        folder = run_dir / SOUP_FOLDER / name
        if (folder / "adapter_config.json").is_file():
            continue
        model, tokenizer = load_model_and_tokenizer(settings.model)
        lora = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.soup_lora_alpha,
            task_type="CAUSAL_LM",
            **_adapter_placement(settings, model),
        )
        checkpoints = run_dir / CHECKPOINT_FOLDER / name
        arguments = _trainer_arguments(settings, checkpoints, steps, batch_size)
        prompt_length, completion_length = arguments.pop("max_prompt_length"), arguments.pop("max_completion_length")
        args = DPOConfig(bf16=False, gradient_checkpointing=False, **arguments)
        trainer = SharedLayersDPOTrainer(
            model, args=args, train_dataset=train[name], processing_class=tokenizer, peft_config=lora
        )
        trainer.train_dataset = truncate_tokenized(trainer.train_dataset, prompt_length, completion_length)
        trainer.train(resume_from_checkpoint=_last_checkpoint(checkpoints) or None)
        trainer.model.save_pretrained(folder)
        logs[name] = trainer.state.log_history
    seconds = time.time() - started
    save_run(run_dir, "rewarded_soups", settings, train_seconds=seconds, log_history=logs)
    return {"train_seconds": seconds}


# --- loading trained runs -----------------------------------------------------------------------------------------


def load_steerable(run_dir: Path) -> tuple[str, RunSettings, Any, PeftModel, PreTrainedTokenizerBase]:
    """The trained model of a run: `(method, settings, steerable, peft_model, tokenizer)`.

    For Panacea the steerable is the `PeftModel` itself; for Rewarded Soups a `RewardedSoup` around it.
    """
    method, settings, _ = load_run(run_dir)
    model, tokenizer = load_model_and_tokenizer(settings.model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    if method == "panacea":
        peft_model = PeftModel.from_pretrained(model, run_dir / ADAPTER_FOLDER)
        steerable: Any = peft_model
    else:
        first, *others = settings.objectives
        peft_model = PeftModel.from_pretrained(model, run_dir / SOUP_FOLDER / first, adapter_name=first)
        for name in others:
            peft_model.load_adapter(run_dir / SOUP_FOLDER / name, adapter_name=name)
        steerable = RewardedSoup(peft_model, settings.objectives)
    peft_model.eval()
    return method, settings, steerable, peft_model, tokenizer


# --- fronts -------------------------------------------------------------------------------------------------------


def evaluate_front(
    run_dir: Path, progress: bool = True, generate_prompts: int = 0, grid_step: float | None = None
) -> Front:
    """Scores a trained run at every λ of the grid on held-out pairs; writes front.json, metrics.json, front.png.

    With `generate_prompts > 0`, also answers that many held-out prompts greedily at every λ and records the mean
    reply length in tokens under `extra["generation"]["mean_reply_tokens"]` (the measure of conciseness).
    `grid_step` replaces the run's grid step for this evaluation only (`run.json` is left as it is).
    """
    started = time.time()
    if grid_step is not None:
        _, settings, _ = load_run(run_dir)
        replace(settings, grid_step=grid_step)  # a bad step fails here, before the model is loaded
    method, settings, steerable, peft_model, tokenizer = load_steerable(run_dir)
    if grid_step is not None:
        settings = replace(settings, grid_step=grid_step)
    _, held_out = load_pairs(settings)
    scorer = PairScorer(
        peft_model,
        tokenizer,
        held_out,
        beta=settings.beta,
        max_prompt_length=settings.max_prompt_length,
        max_completion_length=settings.max_completion_length,
    )
    prompts = [row["prompt"] for row in next(iter(held_out.values())).select(range(generate_prompts))]
    pair_margins: dict[str, list[torch.Tensor]] = {name: [] for name in settings.objectives}

    def score_fn() -> dict[str, dict[str, Any]]:
        scores: dict[str, dict[str, Any]] = scorer()
        for name in settings.objectives:
            pair_margins[name].append(scorer.last_pair_margins[name])
        if prompts:
            scores["generation"] = {"mean_reply_tokens": mean_reply_tokens(peft_model, tokenizer, prompts)}
        return scores

    points = evaluate_preference_grid(steerable, settings.grid, score_fn, settings.objectives, progress=progress)
    steering = steering_slopes(
        torch.tensor([list(point) for point in settings.grid]),
        {name: torch.stack(margins) for name, margins in pair_margins.items()},
        settings.objectives,
    )
    front = Front(
        method=method,
        objectives=list(settings.objectives),
        points=points,
        score_name=SCORE_NAME,
        score_description=SCORE_DESCRIPTION,
        evaluation={
            "data": settings.data_description(),
            "split": "held out by conversation",
            "eval_fraction": settings.eval_fraction,
            "rows": {name: len(rows) for name, rows in held_out.items()},
            "seed": settings.seed,
            "beta": settings.beta,
            "max_prompt_length": settings.max_prompt_length,
            "max_completion_length": settings.max_completion_length,
            "grid": [list(point) for point in settings.grid],
            "generated_prompts": generate_prompts,
            "steering": steering,
            "seconds": round(time.time() - started, 1),
        },
    )
    write_front(run_dir / "front.json", front)
    write_metrics(run_dir, front)
    plot_fronts([front], run_dir / "front.png", title=f"{method}: held-out front")
    if method == "panacea":
        write_model_card(run_dir / ADAPTER_FOLDER, front)
    return front


def write_metrics(run_dir: Path, front: Front, reference_point: Sequence[float] | None = None) -> dict[str, Any]:
    """Writes metrics.json: the front's metrics (`compute_metrics`) and, when measured, its steering slopes."""
    metrics = compute_metrics(front, reference_point=reference_point)
    if "steering" in front.evaluation:
        metrics["steering"] = {
            "description": STEERING_DESCRIPTION,
            "objectives": front.evaluation["steering"],
        }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_model_card(adapter_dir: Path, front: Front) -> None:
    """Adds the objectives and the measured front to the adapter's model card (PEFT's README.md)."""
    card = adapter_dir / "README.md"
    text = card.read_text() if card.is_file() else ""
    marker = "## Panacea: objectives and measured front"
    text = text.split(marker)[0].rstrip()
    rows = "\n".join(
        "| "
        + " | ".join(f"{point.preference[name]:.2f}" for name in front.objectives)
        + " | "
        + " | ".join(f"{point.scores[name]:+.4f}" for name in front.objectives)
        + " |"
        for point in front.points
    )
    header = " | ".join(f"λ {name}" for name in front.objectives) + " | "
    header += " | ".join(f"{name} ({front.score_name})" for name in front.objectives)
    text += (
        f"\n\n{marker}\n\nObjectives, in preference order: {', '.join(front.objectives)}. Steer with "
        "`model.set_preference([...])` after `import peft_panacea`.\n\n"
        f"Held-out front ({front.evaluation.get('data', '')}):\n\n| {header} |\n"
        f"|{'---|' * (2 * len(front.objectives))}\n{rows}\n"
    )
    card.write_text(text)


@torch.no_grad()
def mean_reply_tokens(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict[str, str]]], limit: int = 64
) -> float:
    """Mean length in tokens of greedy replies to chat `prompts` (at most `limit` tokens each)."""
    texts = [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) for prompt in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    replies = outputs[:, inputs["input_ids"].shape[1] :]  # (prompts, new tokens)
    ended = replies == tokenizer.eos_token_id  # (prompts, new tokens)
    full = torch.full_like(replies[:, 0], replies.shape[1])  # (prompts,), on the model's device
    lengths = torch.where(ended.any(dim=1), ended.int().argmax(dim=1), full)  # (prompts,)
    return lengths.float().mean().item()


# --- answers ------------------------------------------------------------------------------------------------------


def answer(
    steerable: Any,
    peft_model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    preferences: Sequence[Mapping[str, float] | Sequence[float]],
    objectives: Sequence[str],
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy answers to one prompt, one per preference.

    With a Panacea adapter the answers come from one batched `generate`, one λ per row; Rewarded Soups mixes one
    preference at a time.
    """
    values = torch.stack([validate_preference(p, len(objectives), objectives) for p in preferences])  # (k, m)
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer([text] * len(values), return_tensors="pt", padding=True, padding_side="left")
    inputs = inputs.to(next(peft_model.parameters()).device)
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    if isinstance(steerable, PeftModel):
        with steerable.preference(values):
            outputs = steerable.generate(**inputs, **options)
    else:
        outputs = []
        for row, value in enumerate(values):
            with steerable.preference(value):
                outputs.append(peft_model.generate(**{k: v[row : row + 1] for k, v in inputs.items()}, **options)[0])
        outputs = torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True, padding_value=tokenizer.pad_token_id)
    new_tokens = outputs[:, inputs["input_ids"].shape[1] :]
    return [reply.strip() for reply in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
