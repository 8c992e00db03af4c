"""Multi-objective DPO on TRL: one DPO loss per objective, aggregated under a preference sampled at each step."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from datasets import Dataset, concatenate_datasets
from peft import PeftModel
from torch.utils.data import Sampler
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from ..aggregation import AGGREGATION_METHODS, aggregate
from ..config import PanaceaConfig
from ..data import check_columns
from ..preference import PREFERENCE_SAMPLINGS, PreferenceSampler, uniform_preference
from ..scoring import find_decoder_stack

logger = get_logger(__name__)

SIGNS_COLUMN = "objective_signs"
"""Per row, one entry per objective: +1 if the first response (`chosen`) is preferred, -1 if the second, 0 if the
row has no label for that objective."""

SUPPORTED_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class MultiObjectiveDPOConfig(DPOConfig):
    """Configuration of `MultiObjectiveDPOTrainer`: TRL's `DPOConfig` plus the objectives and how to weigh them.

    `beta`, `loss_type` (one of `SUPPORTED_LOSS_TYPES`) and `label_smoothing` apply to every objective. On a machine
    without CUDA, `bf16` and `gradient_checkpointing` default to False (TRL's defaults assume a GPU).

    Args:
        objectives (`list[str]`): The objective names, in the order of the adapter's preference vector; they must
            equal the adapter's `preference_names` when it has them.
        aggregation (`str`): `"ls"` (linear scalarization, `sum_i lambda_i L_i`) or `"tchebycheff"`
            (`max_i lambda_i (L_i - z_i)`).
        ideal_point (`list[float]`, *optional*): `z` for Tchebycheff, one value per objective; 0 by default, the
            infimum of the DPO losses.
        label_columns (`dict[str, str]`, *optional*): For one dataset of response pairs with one label per objective
            (`prompt`, `response_0`, `response_1`): objective name -> column holding the index (0 or 1) of the
            preferred response, or None where the row has no label for that objective. Defaults to
            `<objective>_response_id`.
        preference_sampling (`str`): How λ is drawn at each step: `"dirichlet"`, `"uniform"`, `"vertex_mixture"`
            or `"grid"` (see `PreferenceSampler`).
        preference_concentration (`float`): Dirichlet concentration (1 = uniform on the simplex).
        preference_vertex_probability (`float`): For `"vertex_mixture"`, the probability of a corner.
        preference_grid_step (`float`): For `"grid"`, the grid step.
        preference_per_row (`bool`): One λ per row of the batch instead of one per batch.
        eval_preference (`list[float]`, *optional*): λ used in evaluation; the centre of the simplex by default.
        max_prompt_length (`int`, *optional*): Keep only the last this many prompt tokens (the end of a dialogue
            matters most), applied after tokenization and before `max_length`.
        max_completion_length (`int`, *optional*): Keep only the first this many tokens of each response.
        share_frozen_layers (`bool`): When the adapters sit on the upper layers only, compute the lower layers once
            per step for policy and reference alike, and the output head at completion tokens only (one process).
    """

    objectives: list[str] | None = field(
        default=None, metadata={"help": "Objective names, in the order of the adapter's preference vector."}
    )
    aggregation: str = field(
        default="ls",
        metadata={"help": "How the objective losses are combined.", "choices": list(AGGREGATION_METHODS)},
    )
    ideal_point: list[float] | None = field(
        default=None, metadata={"help": "Tchebycheff ideal point z, one value per objective (0 by default)."}
    )
    label_columns: dict[str, str] | None = field(
        default=None,
        metadata={"help": "For a response-pair dataset: objective -> label column (index 0/1 of the preferred one)."},
    )
    preference_sampling: str = field(
        default="dirichlet",
        metadata={"help": "How λ is drawn at each step.", "choices": list(PREFERENCE_SAMPLINGS)},
    )
    preference_concentration: float = field(
        default=1.0, metadata={"help": "Dirichlet concentration; 1 is uniform on the simplex."}
    )
    preference_vertex_probability: float = field(
        default=0.2, metadata={"help": "For 'vertex_mixture': probability of drawing a corner of the simplex."}
    )
    preference_grid_step: float = field(default=0.1, metadata={"help": "For 'grid': the grid step."})
    preference_per_row: bool = field(
        default=False, metadata={"help": "Draw one λ per row of the batch instead of one per batch."}
    )
    eval_preference: list[float] | None = field(
        default=None, metadata={"help": "λ used in evaluation; the centre of the simplex by default."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep only the last this many prompt tokens (before `max_length`)."}
    )
    share_frozen_layers: bool = field(
        default=True,
        metadata={
            "help": "Run the layers below the adapters once per step for both policy and reference (single process)."
        },
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Keep only the first this many tokens of each response."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Trade compute for memory; defaults to True with CUDA, False without."}
    )

    def __post_init__(self) -> None:
        cuda = torch.cuda.is_available()
        if self.bf16 is None:
            self.bf16 = cuda and torch.cuda.is_bf16_supported() and not self.fp16
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = cuda
        super().__post_init__()

        if not self.objectives:
            raise ValueError("`objectives` must name at least one objective, e.g. ['helpful', 'harmless'].")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"`objectives` must be unique names, but got {self.objectives}.")
        if self.aggregation not in AGGREGATION_METHODS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATION_METHODS}, but got {self.aggregation!r}.")
        if self.ideal_point is not None and len(self.ideal_point) != len(self.objectives):
            raise ValueError(
                f"`ideal_point` needs one value per objective ({len(self.objectives)}), but got {self.ideal_point}."
            )
        unsupported = [loss for loss in self.loss_type if loss not in SUPPORTED_LOSS_TYPES]
        if unsupported or len(self.loss_type) != 1:
            raise ValueError(
                f"`loss_type` must be one of {SUPPORTED_LOSS_TYPES} for multi-objective DPO, but got {self.loss_type}."
            )
        ignored = {
            "ld_alpha": self.ld_alpha is not None,
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "use_weighting": self.use_weighting,
            "loss_weights": self.loss_weights is not None and list(self.loss_weights) != [1.0],
        }
        if any(ignored.values()):
            raise ValueError(
                f"{[name for name, set_ in ignored.items() if set_]} are not supported by multi-objective DPO, which "
                "computes its own per-objective losses. Leave them at their defaults."
            )
        if self.use_liger_kernel:
            raise ValueError(
                "`use_liger_kernel=True` is not supported: Liger's loss calls the base model directly and skips the "
                "Panacea layers. Set `use_liger_kernel=False`."
            )
        if self.label_columns is not None:
            unknown = sorted(set(self.label_columns) - set(self.objectives))
            if unknown:
                raise ValueError(f"`label_columns` names unknown objectives {unknown}; objectives: {self.objectives}.")
        # Checked here so that a bad value fails before the model is loaded.
        PreferenceSampler(
            len(self.objectives),
            self.preference_sampling,
            self.preference_concentration,
            self.preference_vertex_probability,
            self.preference_grid_step,
        )


# --- data ---------------------------------------------------------------------------------------------------------


def _label_columns(args: MultiObjectiveDPOConfig) -> dict[str, str]:
    columns = {name: f"{name}_response_id" for name in args.objectives}
    columns.update(args.label_columns or {})
    return columns


def to_signed_pairs(
    dataset: Dataset | Mapping[str, Dataset], args: MultiObjectiveDPOConfig
) -> tuple[Dataset, list[int] | None]:
    """Brings either data layout to TRL's `prompt`, `chosen`, `rejected` plus a `objective_signs` column.

    Layout 1, one dataset of `prompt`, `response_0`, `response_1` with a label column per objective: `chosen` is
    `response_0`, and the sign of an objective is +1 if its label is 0, -1 if it is 1, 0 if missing. One forward pass
    over the pair serves every objective. Rows without any label are dropped.

    Layout 2, a dict `{objective: dataset of prompt, chosen, rejected}`: the datasets are concatenated; a row of
    objective `i` has sign +1 for `i` and 0 for the others.

    Returns:
        The converted dataset and, for layout 2, the objective index of each row (for balanced batches); None for
        layout 1.

    Raises:
        ValueError: For missing columns, unknown objectives, or labels other than 0, 1 and None.
        TypeError: For a dataset that is neither a `Dataset` nor a dict of them.
    """
    objectives = list(args.objectives)
    if isinstance(dataset, Mapping):
        unknown = sorted(set(dataset) - set(objectives))
        missing = [name for name in objectives if name not in dataset]
        if unknown or missing:
            raise ValueError(
                f"The dataset dict must have one dataset per objective {objectives}, but has unknown keys {unknown} "
                f"and lacks {missing}."
            )
        parts, owners = [], []
        for index, name in enumerate(objectives):
            check_columns(dataset[name], ["prompt", "chosen", "rejected"], f"Objective {name!r}")
            signs = [[1 if i == index else 0 for i in range(len(objectives))]] * len(dataset[name])
            part = dataset[name].select_columns(["prompt", "chosen", "rejected"]).add_column(SIGNS_COLUMN, signs)
            parts.append(part)
            owners.extend([index] * len(part))
        return concatenate_datasets(parts), owners

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"`train_dataset` must be a `datasets.Dataset` (one pair, one label per objective) or a dict from "
            f"objective name to `Dataset` (one DPO dataset per objective), but got {type(dataset).__name__}."
        )
    if {"chosen", "rejected"} <= set(dataset.column_names) and len(objectives) == 1:
        signs = [[1]] * len(dataset)
        return dataset.select_columns(["prompt", "chosen", "rejected"]).add_column(SIGNS_COLUMN, signs), None

    label_columns = _label_columns(args)
    check_columns(dataset, ["prompt", "response_0", "response_1"], "A dataset with one label per objective")
    for name in objectives:
        check_columns(dataset, [label_columns[name]], f"Objective {name!r}")

    def signed(row: dict[str, Any]) -> dict[str, Any]:
        signs = []
        for name in objectives:
            label = row[label_columns[name]]
            if label not in (0, 1, None):
                raise ValueError(
                    f"Column `{label_columns[name]}` of objective {name!r} must hold 0, 1 or None (the index of the "
                    f"preferred response), but a row has {label!r}."
                )
            signs.append(0 if label is None else (1 if label == 0 else -1))
        return {
            "prompt": row["prompt"],
            "chosen": row["response_0"],
            "rejected": row["response_1"],
            SIGNS_COLUMN: signs,
        }

    converted = dataset.map(signed, remove_columns=dataset.column_names)
    labelled = converted.filter(lambda row: any(row[SIGNS_COLUMN]))
    if len(labelled) < len(converted):
        logger.warning(f"Dropped {len(converted) - len(labelled)} rows that have no label for any objective.")
    return labelled, None


class ObjectiveBalancedSampler(Sampler[int]):
    """Orders rows so that every batch holds the same number of rows of each objective (layout 2).

    Each objective's rows are shuffled (seeded by `seed` and the epoch), then dealt into batches of
    `batch_size // m` rows per objective, until the smallest objective runs out.
    """

    def __init__(self, owners: list[int], num_objectives: int, batch_size: int, seed: int) -> None:
        if batch_size % num_objectives:
            raise ValueError(
                f"With one dataset per objective, `per_device_train_batch_size` must be a multiple of the number of "
                f"objectives ({num_objectives}) so that every batch has a loss for every objective, but got "
                f"{batch_size}."
            )
        self.rows = [[i for i, owner in enumerate(owners) if owner == k] for k in range(num_objectives)]
        self.per_objective = batch_size // num_objectives
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return min(len(rows) for rows in self.rows) // self.per_objective * self.per_objective * len(self.rows)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = [[rows[i] for i in torch.randperm(len(rows), generator=generator)] for rows in self.rows]
        for start in range(0, len(self) // len(self.rows), self.per_objective):
            for rows in shuffled:
                yield from rows[start : start + self.per_objective]


def truncate_tokenized(dataset: Dataset, max_prompt_length: int | None, max_completion_length: int | None) -> Dataset:
    """Keeps the last `max_prompt_length` prompt tokens and the first `max_completion_length` tokens of each response
    of a dataset tokenized by TRL (`prompt_ids`, `chosen_ids`, `rejected_ids`); None keeps everything."""
    if max_prompt_length is None and max_completion_length is None:
        return dataset

    def truncate(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt_ids": row["prompt_ids"][-max_prompt_length:] if max_prompt_length else row["prompt_ids"],
            "chosen_ids": row["chosen_ids"][:max_completion_length],
            "rejected_ids": row["rejected_ids"][:max_completion_length],
        }

    return dataset.map(truncate, desc="Truncating prompts and responses")


@dataclass
class SignedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator that also stacks `objective_signs` into a `(batch, m)` tensor."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch[SIGNS_COLUMN] = torch.tensor([example[SIGNS_COLUMN] for example in examples], dtype=torch.float32)
        return batch


# --- losses -------------------------------------------------------------------------------------------------------


def dpo_pair_losses(logits: torch.Tensor, beta: float, loss_type: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO losses from `logits = logratio(preferred) - logratio(dispreferred)`, shape kept.

    `sigmoid`: `-(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x)`; `ipo`: `(x - 1 / (2 beta))^2`;
    `hinge`: `relu(1 - beta x)`.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    raise ValueError(f"`loss_type` must be one of {SUPPORTED_LOSS_TYPES}, but got {loss_type!r}.")


# --- trainer ------------------------------------------------------------------------------------------------------


class SharedLayersDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` for a PEFT adapter on the upper layers, running the layers below it once per step.

    The layers below the adapters are frozen and identical for the policy and the reference (the model with its
    adapter disabled, or TRL's frozen copy `"ref"`), so their output is computed once per step without gradients;
    the policy and the reference then run only the adapted layers from it, and the output head only at completion
    tokens. The loss and its gradients are those of `DPOTrainer`.

    TRL's own computation is used where the shortcut does not apply: several processes, a separate `ref_model`,
    adapters that are not all inside one list of decoder layers, or anything but a single `sigmoid` or `hinge` loss
    with TRL's defaults for `ld_alpha`, `f_divergence_type` and `use_weighting` and no mixture-of-experts auxiliary
    loss.

    Args:
        share_frozen_layers: False always uses TRL's computation.
        *args, **kwargs: As for `DPOTrainer`.
    """

    def __init__(self, *args: Any, share_frozen_layers: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The shortcut calls the model directly, not through a distributed wrapper, whose forward it would bypass.
        self._decoder_stack = None
        if share_frozen_layers and self.accelerator.num_processes == 1 and self.ref_model is None:
            self._decoder_stack = find_decoder_stack(self.accelerator.unwrap_model(self.model))

    def _shares_frozen_layers(self) -> bool:
        return (
            self._decoder_stack is not None
            and len(self.loss_types) == 1
            and self.loss_types[0] in ("sigmoid", "hinge")
            and self.ld_alpha is None
            and self.f_divergence_type == "reverse_kl"
            and not self.use_weighting
            and not self.aux_loss_enabled
        )

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if return_outputs or not self._shares_frozen_layers():
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        logps, reference = self._logps_from_shared_prefix(model, inputs)  # (2 * batch,) each
        if self.precompute_ref_logps:
            reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps.device)
        chosen_logps, rejected_logps = logps.chunk(2)  # (batch,) each: the batch is [chosen, rejected]
        chosen_logratios, rejected_logratios = (logps - reference).chunk(2)  # (batch,) each
        # TRL's sigmoid loss has no label smoothing (its "robust" loss does).
        losses = dpo_pair_losses(chosen_logratios - rejected_logratios, self.beta, self.loss_types[0])  # (batch,)
        loss = losses.mean() * self.loss_weights[0]

        metrics = self._metrics[mode]
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_rewards = self.beta * chosen_logratios.detach()  # (batch,)
        rejected_rewards = self.beta * rejected_logratios.detach()  # (batch,)
        for name, values in (
            ("rewards/chosen", chosen_rewards),
            ("rewards/rejected", rejected_rewards),
            ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
            ("rewards/margins", chosen_rewards - rejected_rewards),
            ("logps/chosen", chosen_logps.detach()),
            ("logps/rejected", rejected_logps.detach()),
        ):
            metrics[name].append(self.accelerator.gather(values).mean().item())
        return loss

    def _logps_from_shared_prefix(
        self, model: Any, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Policy and reference log-probabilities of every row (summed over its completion), sharing one pass through
        the layers below the adapters; the reference is None when it was precomputed."""
        stack = self._decoder_stack
        with stack.capture(stop=True) as captured:
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        masks = (inputs["input_ids"], inputs["completion_mask"], inputs["attention_mask"])
        policy = stack.completion_logps(stack.suffix(captured["hidden"], captured["kwargs"]), *masks)  # (2 * batch,)
        if self.precompute_ref_logps:
            return policy, None

        unwrapped = self.accelerator.unwrap_model(self.model)
        adapter = "ref" if "ref" in unwrapped.peft_config else None
        with torch.no_grad(), use_adapter(unwrapped, adapter_name=adapter):
            hidden = stack.suffix(captured["hidden"].detach(), captured["kwargs"])  # (2 * batch, seq, hidden)
            reference = stack.completion_logps(hidden, *masks)  # (2 * batch,)
        return policy, reference


class MultiObjectiveDPOTrainer(SharedLayersDPOTrainer):
    """Multi-objective DPO (Panacea's MDPO) on TRL's `DPOTrainer`.

    Each step draws a preference λ on the simplex, sets it on the Panacea adapter, computes one DPO loss per
    objective with the λ-conditioned policy, and back-propagates their aggregate (`args.aggregation`). The reference
    is the starting policy: the base model with the adapter disabled for a new adapter, or TRL's frozen copy `"ref"`
    of a given adapter, which receives every tensor of the adapter, λ included.

    ```py
    >>> import peft_panacea
    >>> from peft_panacea import PanaceaConfig
    >>> from peft_panacea.trainers import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer
    >>> args = MultiObjectiveDPOConfig(output_dir="out", objectives=["helpful", "harmless"], beta=0.1)
    >>> trainer = MultiObjectiveDPOTrainer(
    ...     model, args=args, train_dataset={"helpful": helpful_pairs, "harmless": harmless_pairs},
    ...     processing_class=tokenizer,
    ...     peft_config=PanaceaConfig(preference_dim=2, preference_names=["helpful", "harmless"]),
    ... )
    >>> trainer.train()
    ```

    Data (see `to_signed_pairs`): one `Dataset` of `prompt`, `response_0`, `response_1` with a label column per
    objective (`args.label_columns`), or a dict `{objective: Dataset of prompt, chosen, rejected}`.

    Logged per objective `name`: `loss/<name>`, `rewards/<name>/chosen`, `rewards/<name>/rejected`,
    `rewards/<name>/margin`, `rewards/<name>/accuracy` (for the response each objective prefers), and
    `preference/<name>`, the mean λ of the step.
    """

    _tag_names = ["trl", "dpo", "panacea", "multi-objective"]

    def __init__(
        self,
        model: Any,
        args: MultiObjectiveDPOConfig,
        train_dataset: Dataset | Mapping[str, Dataset],
        eval_dataset: Dataset | Mapping[str, Dataset] | None = None,
        peft_config: PanaceaConfig | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MultiObjectiveDPOConfig):
            raise TypeError(f"`args` must be a `MultiObjectiveDPOConfig`, but got {type(args).__name__}.")
        if kwargs.get("ref_model") is not None:
            raise ValueError("`ref_model` is not used: the reference is the starting adapter state. Leave it unset.")
        if peft_config is not None and not isinstance(peft_config, PanaceaConfig):
            raise TypeError(f"`peft_config` must be a `PanaceaConfig`, but got {type(peft_config).__name__}.")
        if peft_config is None and not isinstance(model, PeftModel):
            raise ValueError(
                "The model has no Panacea adapter: pass `peft_config=PanaceaConfig(...)`, or a model wrapped with "
                "`get_peft_model` / `PeftModel.from_pretrained(..., is_trainable=True)`."
            )
        if args.precompute_ref_log_probs and isinstance(model, PeftModel):
            raise ValueError(
                "`precompute_ref_log_probs=True` needs a reference that does not depend on the preference, but the "
                "reference of an already wrapped model is a copy of its adapter, whose output changes with λ. Pass "
                "the base model with `peft_config=PanaceaConfig(...)` (the reference is then the base model), or set "
                "`precompute_ref_log_probs=False`."
            )
        adapter_config = peft_config if peft_config is not None else model.peft_config.get("default")
        self._check_adapter(adapter_config, args)

        train_signed, owners = to_signed_pairs(train_dataset, args)
        eval_signed = to_signed_pairs(eval_dataset, args)[0] if eval_dataset is not None else None
        self._balanced_batches = owners is not None
        args.remove_unused_columns = False

        self.preference_sampler = PreferenceSampler(
            len(args.objectives),
            args.preference_sampling,
            args.preference_concentration,
            args.preference_vertex_probability,
            args.preference_grid_step,
            seed=args.seed,
        )
        self._draw = 0
        self._draw_step = -1

        super().__init__(
            model,
            args=args,
            train_dataset=train_signed,
            eval_dataset=eval_signed,
            peft_config=peft_config,
            data_collator=data_collator,
            share_frozen_layers=args.share_frozen_layers,
            **kwargs,
        )
        if data_collator is None:
            self.data_collator = SignedPreferenceCollator(
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )

        self._sync_reference_adapter()
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "The Panacea adapter has no trainable parameters, so training would change nothing. It was probably "
                "loaded for inference: load it with `PeftModel.from_pretrained(base, path, is_trainable=True)`."
            )

    @staticmethod
    def _check_adapter(config: Any, args: MultiObjectiveDPOConfig) -> None:
        if not isinstance(config, PanaceaConfig):
            raise TypeError(
                f"The model's adapter must be a Panacea adapter, but its config is {type(config).__name__}."
            )
        if config.preference_names is not None and list(config.preference_names) != list(args.objectives):
            raise ValueError(
                f"`objectives` {args.objectives} must equal the adapter's `preference_names` "
                f"{config.preference_names}, in the same order."
            )
        if config.preference_dim != len(args.objectives):
            raise ValueError(
                f"The adapter has `preference_dim={config.preference_dim}`, but {len(args.objectives)} objectives "
                f"were given: {args.objectives}."
            )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trains, then leaves the adapter at the centre of the simplex (not at the last sampled preference)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._set_preference(uniform_preference(len(self.args.objectives)))

    def _panacea_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model).base_model

    def _sync_reference_adapter(self) -> None:
        """Makes TRL's reference adapter `"ref"`, when it made one, an exact copy of `"default"` (λ included)."""
        tuner = self._panacea_model()
        if "ref" not in tuner.peft_config:
            return
        from ..layer import PanaceaLayer

        with torch.no_grad():
            for layer in tuner.model.modules():
                if not isinstance(layer, PanaceaLayer) or "default" not in layer.panacea_A:
                    continue
                for name in layer.adapter_layer_names:
                    getattr(layer, name)["ref"].copy_(getattr(layer, name)["default"])
                layer.set_preference_tensor("ref", layer.panacea_preference["default"])

    def _set_sampler_state(self) -> None:
        """Draw counter: one draw per micro-batch, a pure function of the global step, so resuming repeats it."""
        if self.state.global_step != self._draw_step:
            self._draw_step = self.state.global_step
            self._draw = 0

    def _next_preference(self, batch_size: int) -> torch.Tensor:
        if not self.model.training:
            if self.args.eval_preference is not None:
                return torch.tensor(self.args.eval_preference, dtype=torch.float32)
            return uniform_preference(len(self.args.objectives))
        self._set_sampler_state()
        index = self._draw_step * self.args.gradient_accumulation_steps + self._draw
        self._draw += 1
        rows = batch_size if self.args.preference_per_row else None
        return self.preference_sampler.sample(index, rows=rows)

    def _set_preference(self, preference: torch.Tensor) -> None:
        tuner = self._panacea_model()
        if preference.dim() == 2:
            preference = torch.cat([preference, preference])  # (2 * batch, m): chosen rows, then rejected rows
        for adapter_name in ("default", "ref"):
            if adapter_name in tuner.peft_config:
                tuner.set_preference(preference, adapter_name=adapter_name)

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        if not self._balanced_batches:
            return super()._get_train_sampler(train_dataset)
        # Read from the prepared dataset: TRL drops the rows whose prompt alone fills `max_length`.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        owners = torch.tensor(dataset[SIGNS_COLUMN]).abs().argmax(dim=1).tolist()  # (rows,)
        return ObjectiveBalancedSampler(
            owners, len(self.args.objectives), self.args.per_device_train_batch_size, self.args.seed
        )

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: DPOConfig, dataset_name: str) -> Dataset:
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return truncate_tokenized(dataset, args.max_prompt_length, args.max_completion_length)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if SIGNS_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SIGNS_COLUMN]

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        signs = inputs.pop(SIGNS_COLUMN)  # (batch, m), never shown to the model
        preference = self._next_preference(batch_size=signs.shape[0])  # (m,) or (batch, m)
        self._set_preference(preference)

        # Policy and reference log-probabilities of both responses, summed over completion tokens.
        completion_mask = inputs["completion_mask"]  # (2 * batch, seq)
        shift_mask = completion_mask[..., 1:]  # (2 * batch, seq - 1)
        outputs = None
        if self._decoder_stack is not None and not return_outputs:
            logps, reference = self._logps_from_shared_prefix(model, inputs)  # (2 * batch,) each
        else:
            model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(**model_inputs, labels=labels, use_cache=False, fused_lm_head=True)
            logps = outputs.log_probs[:, -shift_mask.size(1) :].sum(dim=1)  # (2 * batch,)
            reference = None
        first_logps, second_logps = logps.chunk(2)  # (batch,) each
        if self.precompute_ref_logps:
            ref_first, ref_second = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif reference is not None:
            ref_first, ref_second = reference.chunk(2)
        else:
            ref_first, ref_second = self.compute_ref_log_probs(model, inputs)
        first_logratios = first_logps - ref_first.to(first_logps.device)  # (batch,)
        second_logratios = second_logps - ref_second.to(second_logps.device)  # (batch,)

        # A pair whose completion was cut away entirely carries no signal: zero weight.
        completion_tokens = shift_mask.sum(dim=1)  # (2 * batch,)
        valid = (completion_tokens.chunk(2)[0] > 0) & (completion_tokens.chunk(2)[1] > 0)  # (batch,)
        signs = signs.to(logps.device) * valid.unsqueeze(-1)  # (batch, m)
        present = signs != 0  # (batch, m)

        # One DPO loss per pair and objective, for the response that objective prefers.
        pair_logits = signs * (first_logratios - second_logratios).unsqueeze(-1)  # (batch, m)
        pair_losses = dpo_pair_losses(pair_logits, self.beta, self.loss_types[0], self.label_smoothing)  # (batch, m)
        pair_losses = pair_losses.masked_fill(~present, 0.0)

        preference = preference.to(logps.device)
        ideal = None
        if self.args.aggregation == "tchebycheff":
            ideal = torch.tensor(self.args.ideal_point or 0.0, device=logps.device, dtype=pair_losses.dtype)
        if preference.dim() == 2:
            loss = aggregate(pair_losses, preference, self.args.aggregation, ideal, mask=present)
        else:
            counts = present.sum(dim=0)  # (m,)
            objective_losses = pair_losses.sum(dim=0) / counts.clamp(min=1)  # (m,)
            loss = aggregate(objective_losses, preference, self.args.aggregation, ideal, mask=counts > 0)

        self._log_objectives(
            mode, pair_logits.detach(), pair_losses.detach(), first_logratios, second_logratios, signs, preference
        )
        return (loss, outputs) if return_outputs else loss

    def _log_objectives(
        self,
        mode: str,
        pair_logits: torch.Tensor,
        pair_losses: torch.Tensor,
        first_logratios: torch.Tensor,
        second_logratios: torch.Tensor,
        signs: torch.Tensor,
        preference: torch.Tensor,
    ) -> None:
        present = (signs != 0).float()  # (batch, m)
        preferred = torch.where(signs >= 0, first_logratios.unsqueeze(-1), second_logratios.unsqueeze(-1))
        dispreferred = torch.where(signs >= 0, second_logratios.unsqueeze(-1), first_logratios.unsqueeze(-1))
        rewards_preferred = self.beta * preferred.detach()  # (batch, m)
        rewards_dispreferred = self.beta * dispreferred.detach()  # (batch, m)
        sums = torch.stack(
            [
                present,
                pair_losses * present,
                rewards_preferred * present,
                rewards_dispreferred * present,
                self.beta * pair_logits * present,
                (pair_logits > 0).float() * present,
            ]
        ).sum(dim=1)  # (6, m)
        sums = self.accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(dim=0)  # (6, m), over processes
        metrics = self._metrics[mode]
        for i, name in enumerate(self.args.objectives):
            count = sums[0, i].item()
            if count == 0:
                continue
            metrics[f"loss/{name}"].append(sums[1, i].item() / count)
            metrics[f"rewards/{name}/chosen"].append(sums[2, i].item() / count)
            metrics[f"rewards/{name}/rejected"].append(sums[3, i].item() / count)
            metrics[f"rewards/{name}/margin"].append(sums[4, i].item() / count)
            metrics[f"rewards/{name}/accuracy"].append(sums[5, i].item() / count)
        mean_preference = preference.reshape(-1, len(self.args.objectives)).mean(dim=0)
        for i, name in enumerate(self.args.objectives):
            metrics[f"preference/{name}"].append(mean_preference[i].item())


__all__ = [
    "MultiObjectiveDPOConfig",
    "MultiObjectiveDPOTrainer",
    "ObjectiveBalancedSampler",
    "SharedLayersDPOTrainer",
    "SignedPreferenceCollator",
    "dpo_pair_losses",
    "to_signed_pairs",
]
