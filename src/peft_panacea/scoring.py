"""Scoring a steerable model on held-out preference pairs, and sweeping it over a preference grid.

`PairScorer` measures DPO's implicit reward of a model on preference pairs of each objective: preference accuracy
and mean margin against a reference (the model with its adapters disabled). It is built for sweeping one model over
many preferences: the pairs are tokenized once, the reference log-probabilities are computed once, and, when the
adapters sit on the upper layers of a decoder only, the lower layers' output, which no preference changes, is
computed once and reused at every preference.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from .pareto import FrontPoint


class Steerable(Protocol):
    """Anything whose behaviour a preference selects within a `with steerable.preference(λ):` block."""

    def preference(self, preference: Sequence[float]) -> Any: ...


def evaluate_preference_grid(
    steerable: Steerable,
    grid: Iterable[Sequence[float] | torch.Tensor],
    score_fn: Callable[[], Mapping[str, Mapping[str, float]]],
    names: Sequence[str],
    progress: bool = True,
    score_metric: str = "margin",
) -> list[FrontPoint]:
    """Scores a steerable model at every preference of a grid.

    For each λ of `grid`, enters `steerable.preference(λ)` (a Panacea `PeftModel`, or a Rewarded Soups mixer, both
    restore the previous λ on exit) and calls `score_fn()`, which measures the model as it stands and returns
    `{objective: {metric: value}}`.

    Args:
        steerable: An object with a context-manager method `preference(λ)` taking a list of `m` weights.
        grid: The preferences, each `m` weights in `names` order (e.g. `simplex_grid(m, 0.1)`).
        score_fn: Measures the current model; returns `{objective: {metric: value}}` with every objective of `names`.
        names: The objective names, `m` of them.
        progress: Whether to show a tqdm progress bar.
        score_metric: The metric of `score_fn`'s result that becomes each point's score (the rest go to `extra`).

    Returns:
        One `FrontPoint` per grid point, in grid order; build a `Front` from them.

    Raises:
        TypeError: If `steerable` has no `preference` method, or `score_fn` does not return a dict of dicts.
        ValueError: If `names` is empty or not unique, a grid point does not have `m` weights, or `score_fn`'s result
            lacks an objective or `score_metric`.
    """
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`names` must be a non-empty list of unique objective names, but got {names}.")
    if not callable(getattr(steerable, "preference", None)):
        raise TypeError(
            f"`steerable` must have a context-manager method `preference(λ)` (as a Panacea `PeftModel` has), but "
            f"{type(steerable).__name__} has none."
        )

    points = []
    # With `progress`, tqdm's own settings apply (for instance `TQDM_DISABLE=1` in the environment).
    bar = tqdm(grid, desc="preference grid", unit="λ", **({} if progress else {"disable": True}))
    for weights in bar:
        weights = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
        if len(weights) != len(names):
            raise ValueError(
                f"Every `grid` point must have {len(names)} weights, one per objective of {names}, but got {weights}."
            )

        bar.set_postfix_str(", ".join(f"{name}={w:.2f}" for name, w in zip(names, weights)))
        with steerable.preference(weights):
            metrics = score_fn()
        points.append(_point_from_metrics(names, weights, metrics, score_metric))
    return points


def _point_from_metrics(names: list[str], weights: list[float], metrics: Any, score_metric: str) -> FrontPoint:
    if not isinstance(metrics, Mapping) or not all(isinstance(value, Mapping) for value in metrics.values()):
        raise TypeError(f"`score_fn` must return {{objective: {{metric: value}}}}, but returned {metrics!r}.")
    missing = [name for name in names if score_metric not in metrics.get(name, {})]
    if missing:
        raise ValueError(
            f"`score_fn` must return the metric {score_metric!r} for every objective of {names}, but it is missing "
            f"for {missing} in {metrics!r}. Return it, or pass the right `score_metric`."
        )

    return FrontPoint(
        preference=dict(zip(names, weights)),
        scores={name: float(metrics[name][score_metric]) for name in names},
        extra={
            name: {metric: None if value is None else float(value) for metric, value in values.items()}
            for name, values in metrics.items()
        },
    )


def implicit_reward_scores(
    policy_logps_chosen: torch.Tensor,
    policy_logps_rejected: torch.Tensor,
    ref_logps_chosen: torch.Tensor,
    ref_logps_rejected: torch.Tensor,
    beta: float,
) -> dict[str, float]:
    """DPO's implicit reward on held-out pairs: preference accuracy and mean margin, with standard errors.

    The implicit reward of a response is `r = beta * (log pi(y | x) - log pi_ref(y | x))` and the margin of a pair is
    `r(chosen) - r(rejected)`. A pair counts 1 when its margin is positive, 0.5 when it is exactly 0 (a tie, e.g. the
    policy equals the reference) and 0 otherwise; `accuracy` is the mean of these counts. The standard errors are the
    sample standard deviations (`ddof=1`) divided by `sqrt(n)`; they are NaN for a single pair.

    Args:
        policy_logps_chosen: Summed log-probabilities of the chosen completions under the policy, `(n,)`.
        policy_logps_rejected: The same for the rejected completions, `(n,)`.
        ref_logps_chosen: The chosen completions under the reference model, `(n,)`.
        ref_logps_rejected: The rejected completions under the reference model, `(n,)`.
        beta: The DPO temperature, positive.

    Returns:
        `{"accuracy", "accuracy_stderr", "margin", "margin_stderr", "num_pairs"}`.

    Raises:
        TypeError: If an input is not a tensor or `beta` is not a number.
        ValueError: If the inputs are not 1-D of one common, non-zero length, or `beta` is not positive and finite.
    """
    inputs = {
        "policy_logps_chosen": policy_logps_chosen,
        "policy_logps_rejected": policy_logps_rejected,
        "ref_logps_chosen": ref_logps_chosen,
        "ref_logps_rejected": ref_logps_rejected,
    }
    for argument, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{argument}` must be a tensor of shape (n,), but got {type(value).__name__}.")
    shapes = {argument: tuple(value.shape) for argument, value in inputs.items()}
    if len(set(shapes.values())) != 1 or policy_logps_chosen.dim() != 1 or policy_logps_chosen.numel() == 0:
        raise ValueError(f"The log-probabilities must all have the same shape (n,) with n >= 1, but got {shapes}.")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"`beta` must be a number, but got {type(beta).__name__}.")
    if not 0 < beta < math.inf:
        raise ValueError(f"`beta` must be positive and finite, but got {beta}.")

    return scores_from_margins(pair_margins(*inputs.values(), beta))


def scores_from_margins(margins: torch.Tensor) -> dict[str, float]:
    """`implicit_reward_scores` from the pairs' margins `(n,)`, float64."""
    wins = (margins > 0).double() + 0.5 * (margins == 0).double()  # (n,)
    num_pairs = margins.numel()
    return {
        "accuracy": wins.mean().item(),
        "accuracy_stderr": _standard_error(wins),
        "margin": margins.mean().item(),
        "margin_stderr": _standard_error(margins),
        "num_pairs": num_pairs,
    }


def pair_margins(
    policy_logps_chosen: torch.Tensor,
    policy_logps_rejected: torch.Tensor,
    ref_logps_chosen: torch.Tensor,
    ref_logps_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Each pair's implicit reward margin `r(chosen) - r(rejected)`, float64 on the CPU, shape of the inputs."""
    chosen, rejected, ref_chosen, ref_rejected = (
        value.detach().double().cpu()
        for value in (policy_logps_chosen, policy_logps_rejected, ref_logps_chosen, ref_logps_rejected)
    )
    return beta * (chosen - ref_chosen) - beta * (rejected - ref_rejected)


def _standard_error(values: torch.Tensor) -> float:
    if values.numel() < 2:
        return math.nan
    return (values.std(correction=1) / math.sqrt(values.numel())).item()


def steering_slopes(
    preferences: torch.Tensor, pair_margins: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """How strongly each objective's held-out margin follows its own weight, with a paired standard error.

    For objective `i` and each of its held-out pairs, the least-squares slope of that pair's margin against
    `lambda_i` over the grid; the result is the mean slope over the pairs and its standard error. Every pair is scored
    at every λ, so the spread between pairs (their different difficulty) cancels out: the standard error measures
    only how consistently the pairs move with the weight. A positive slope several standard errors from zero means
    that λ steers that objective.

    Args:
        preferences: The grid, `(points, m)`, in `names` order.
        pair_margins: `{objective: (points, pairs)}`, the margin of every held-out pair at every grid point.
        names: The objective names, `m` of them.

    Returns:
        `{objective: {"slope", "slope_stderr", "num_pairs"}}`; the standard error is None for a single pair.

    Raises:
        ValueError: If the shapes disagree, or an objective's weight does not vary over the grid.
    """
    preferences = torch.as_tensor(preferences, dtype=torch.float64)
    if preferences.dim() != 2 or preferences.shape[1] != len(names):
        raise ValueError(
            f"`preferences` must have shape (points, {len(names)}), one column per objective of {list(names)}, "
            f"but has shape {tuple(preferences.shape)}."
        )
    result = {}
    for i, name in enumerate(names):
        margins = torch.as_tensor(pair_margins[name], dtype=torch.float64)  # (points, pairs)
        if margins.dim() != 2 or margins.shape[0] != preferences.shape[0]:
            raise ValueError(
                f"`pair_margins[{name!r}]` must have shape ({preferences.shape[0]}, pairs), one row per grid point, "
                f"but has shape {tuple(margins.shape)}."
            )
        weights = preferences[:, i] - preferences[:, i].mean()  # (points,)
        spread = (weights**2).sum()
        if spread == 0:
            raise ValueError(f"The weight of {name!r} is the same at every grid point; its slope is undefined.")
        slopes = (weights.unsqueeze(1) * (margins - margins.mean(dim=0))).sum(dim=0) / spread  # (pairs,)
        stderr = _standard_error(slopes)
        result[name] = {
            "slope": slopes.mean().item(),
            "slope_stderr": None if math.isnan(stderr) else stderr,
            "num_pairs": slopes.numel(),
        }
    return result


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens of each sequence, without gradients.

    Token `t` is scored by the logits at position `t - 1` (labels shifted by one); only tokens where both
    `completion_mask` and `attention_mask` are 1 are counted, so the first token of a sequence is never counted.
    Padding on the right is the safe layout for every model (with left padding, models with absolute positions see
    shifted positions). Put the model in eval mode first: this function leaves the mode as it is.

    Args:
        model: A causal language model (or a PEFT model around one) whose output has `.logits`.
        batch: `input_ids`, `attention_mask` and `completion_mask`, each `(batch, seq)`; they are moved to the
            model's device.

    Returns:
        The summed log-probabilities, float32 `(batch,)`.

    Raises:
        TypeError: If `batch` is not a mapping of tensors.
        ValueError: If a key is missing or the shapes differ or are not 2-D.
    """
    keys = ("input_ids", "attention_mask", "completion_mask")
    if not isinstance(batch, Mapping):
        raise TypeError(f"`batch` must be a dict with {list(keys)}, but got {type(batch).__name__}.")
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(f"`batch` must have the keys {list(keys)}, but is missing {missing}.")
    if not all(isinstance(batch[key], torch.Tensor) for key in keys):
        raise TypeError(f"`batch` must hold tensors, but got {[type(batch[key]).__name__ for key in keys]}.")
    shapes = {key: tuple(batch[key].shape) for key in keys}
    if len(set(shapes.values())) != 1 or batch["input_ids"].dim() != 2:
        raise ValueError(f"`batch` tensors must all have the same shape (batch, seq), but got {shapes}.")

    device = next(model.parameters()).device
    input_ids, attention_mask, completion_mask = (batch[key].to(device) for key in keys)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (batch, seq-1, vocab)
    labels = input_ids[:, 1:]  # (batch, seq-1)
    label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (batch, seq-1)
    token_logps = label_logits - torch.logsumexp(logits, dim=-1)  # (batch, seq-1)
    counted = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # (batch, seq-1)
    return torch.where(counted, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)  # (batch,)


# --- held-out pair scoring ------------------------------------------------------------------------------------------


class _PrefixCaptured(Exception):
    """Stops a forward pass once the input of the first adapted layer is captured."""


@dataclass
class DecoderStack:
    """The decoder layers of a model around its adapters.

    Layers below `first` hold no adapter, so their output does not depend on the preference or on whether the
    adapters are enabled: it can be computed once (`capture`) and the rest of the model run from it (`suffix`), for
    every preference, and for the reference model too.
    """

    layers: nn.ModuleList
    first: int
    norm: nn.Module
    head: nn.Module

    @contextlib.contextmanager
    def capture(self, stop: bool = False) -> Iterator[dict[str, Any]]:
        """Records the input of the first adapted layer during a forward pass run inside the block.

        With `stop=True` the forward pass ends there (run it inside the block; the block swallows the stop).
        """
        captured: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if "hidden" not in captured:
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]
                captured["kwargs"] = {key: value for key, value in kwargs.items() if key != "hidden_states"}
            if stop:
                raise _PrefixCaptured

        handle = self.layers[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield captured
        except _PrefixCaptured:
            pass
        finally:
            handle.remove()

    def suffix(self, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """Runs the adapted layers and the final norm from a captured input: `(batch, seq, hidden)`."""
        for layer in self.layers[self.first :]:
            output = layer(hidden, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        return self.norm(hidden)  # (batch, seq, hidden)

    def completion_logps(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Log-probabilities summed over completion tokens `(batch,)`, the output head run at those positions only."""
        input_ids = input_ids.to(hidden.device)
        counted = (completion_mask[:, 1:] * attention_mask[:, 1:]).bool().to(hidden.device)  # (batch, seq - 1)
        rows = torch.arange(input_ids.shape[0], device=hidden.device).unsqueeze(1).expand_as(counted)[counted]  # (n,)
        logits = self.head(hidden[:, :-1][counted]).float()  # (n, vocab)
        token_logps = logits.gather(-1, input_ids[:, 1:][counted].unsqueeze(-1)).squeeze(-1)  # (n,)
        token_logps = token_logps - torch.logsumexp(logits, dim=-1)  # (n,)
        sums = torch.zeros(input_ids.shape[0], device=hidden.device, dtype=token_logps.dtype)  # (batch,)
        return sums.index_add(0, rows, token_logps)


FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm")


def find_decoder_stack(model: nn.Module) -> DecoderStack | None:
    """Finds the decoder layer list that holds every adapted module, its final norm and the output head.

    Returns None when the adapters are not all inside one `nn.ModuleList` of layers with a known final norm; the
    caller then runs the whole model at every preference.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapted = [name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)]
    if not adapted:
        return None
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or not name:
            continue
        prefix = name + "."
        if not all(key.startswith(prefix) for key in adapted):
            continue
        owner = base.get_submodule(name.rpartition(".")[0])
        norm = next((getattr(owner, attr) for attr in FINAL_NORM_NAMES if hasattr(owner, attr)), None)
        head = base.get_output_embeddings()
        if norm is None or head is None:
            return None
        first = min(int(key[len(prefix) :].split(".")[0]) for key in adapted)
        return DecoderStack(layers=module, first=first, norm=norm, head=head)
    return None


def tokenize_pair(
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    completion: str | list[dict[str, str]],
    max_prompt_length: int | None,
    max_completion_length: int | None,
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of one completion, as the trainers see them.

    Conversational rows go through the chat template (the completion is what the full conversation adds to the
    prompt with its generation prompt); plain strings are tokenized as they are, the completion ending with the
    end-of-sequence token. The prompt keeps its last `max_prompt_length` tokens, the completion its first
    `max_completion_length`.
    """
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + completion, return_dict=True)["input_ids"]
        shared = 0
        while shared < min(len(prompt_ids), len(full_ids)) and prompt_ids[shared] == full_ids[shared]:
            shared += 1
        prompt_ids, completion_ids = full_ids[:shared], full_ids[shared:]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    if max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    return list(prompt_ids), list(completion_ids[:max_completion_length])


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])  # (rows, width)


class PairScorer:
    """Scores a model's implicit DPO reward on held-out preference pairs of each objective, at its current state.

    Call it inside `with model.preference(λ):` (or use it as `score_fn` of `evaluate_preference_grid`): it returns
    `{objective: implicit_reward_scores(...)}`. The reference log-probabilities come from the same model with its
    adapters disabled, computed once. After each call, `last_pair_margins` holds `{objective: (pairs,)}`, the margin
    of every pair (for `steering_slopes`).

    Args:
        model: A PEFT model (Panacea, or LoRA for Rewarded Soups) around a causal language model.
        tokenizer: Its tokenizer.
        pairs: `{objective: rows}`, each row a dict (or a `Dataset` row) with `prompt`, `chosen` and `rejected`, in
            the conversational or plain form.
        beta: The DPO temperature of the implicit reward.
        max_prompt_length: Keep the last this many prompt tokens.
        max_completion_length: Keep the first this many tokens of each response.
        batch_size: Pairs per forward pass.

    Raises:
        ValueError: If an objective has no pairs, or a row lacks `prompt`, `chosen` or `rejected`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pairs: Mapping[str, Iterable[Mapping[str, Any]]],
        beta: float = 0.1,
        max_prompt_length: int | None = 64,
        max_completion_length: int | None = 64,
        batch_size: int = 8,
    ) -> None:
        self.model = model
        self.beta = beta
        self.stack = find_decoder_stack(model)
        self.last_pair_margins: dict[str, torch.Tensor] = {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        self.batches: dict[str, list[dict[str, torch.Tensor]]] = {}
        for name, rows in pairs.items():
            rows = list(rows)
            if not rows:
                raise ValueError(f"Objective {name!r} has no pairs to score.")
            sequences, masks = [], []
            for row in rows:
                missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
                if missing:
                    raise ValueError(f"A pair of objective {name!r} lacks {missing}; it has {sorted(row)}.")
                for completion in (row["chosen"], row["rejected"]):
                    prompt_ids, completion_ids = tokenize_pair(
                        tokenizer, row["prompt"], completion, max_prompt_length, max_completion_length
                    )
                    sequences.append(prompt_ids + completion_ids)
                    masks.append([0] * len(prompt_ids) + [1] * len(completion_ids))
            self.batches[name] = [
                self._batch(sequences, masks, range(start, min(start + 2 * batch_size, len(sequences))), pad)
                for start in range(0, len(sequences), 2 * batch_size)
            ]

        self._prefix: dict[str, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        with self._reference():
            self.reference = {name: self._logps(name) for name in self.batches}

    @staticmethod
    def _batch(sequences: list[list[int]], masks: list[list[int]], rows: range, pad: int) -> dict[str, torch.Tensor]:
        # Chosen and rejected of a pair are neighbours (2k, 2k + 1): reorder as [chosen...; rejected...].
        order = [i for i in rows if i % 2 == 0] + [i for i in rows if i % 2 == 1]
        return {
            "input_ids": _pad([sequences[i] for i in order], pad),  # (2 * pairs, seq)
            "attention_mask": _pad([[1] * len(sequences[i]) for i in order], 0),  # (2 * pairs, seq)
            "completion_mask": _pad([masks[i] for i in order], 0),  # (2 * pairs, seq)
        }

    def _reference(self) -> Any:
        return self.model.disable_adapter()

    @torch.no_grad()
    def _logps(self, name: str) -> torch.Tensor:
        """Summed completion log-probabilities of every sequence of `name`, `(2 * pairs,)` as [chosen; rejected]."""
        if self.stack is None:
            return torch.cat([sequence_logps(self.model, batch).view(2, -1) for batch in self.batches[name]], dim=1)

        if name not in self._prefix:
            self._prefix[name] = [self._capture_prefix(batch) for batch in self.batches[name]]
        parts = []
        for batch, (hidden, kwargs) in zip(self.batches[name], self._prefix[name]):
            hidden = self.stack.suffix(hidden, kwargs)  # (2 * pairs, seq, hidden)
            logps = self.stack.completion_logps(
                hidden, batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
            )  # (2 * pairs,)
            parts.append(logps.view(2, -1))  # (2, pairs)
        return torch.cat(parts, dim=1)  # (2, all pairs)

    def _capture_prefix(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        device = next(self.model.parameters()).device
        with self.stack.capture(stop=True) as captured:
            self.model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            )
        return captured["hidden"], captured["kwargs"]

    def __call__(self) -> dict[str, dict[str, float]]:
        """`{objective: {"accuracy", "accuracy_stderr", "margin", "margin_stderr", "num_pairs"}}` right now."""
        scores = {}
        self.last_pair_margins = {}
        for name in self.batches:
            policy = self._logps(name)  # (2, pairs)
            reference = self.reference[name]  # (2, pairs)
            margins = pair_margins(policy[0], policy[1], reference[0], reference[1], self.beta)  # (pairs,)
            scores[name] = scores_from_margins(margins)
            self.last_pair_margins[name] = margins
        return scores
