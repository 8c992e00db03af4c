"""Rewarded Soups, the baseline: one LoRA adapter per objective, mixed by the preference.

Rewarded Soups (Ramé et al., 2023, https://arxiv.org/abs/2306.04488) fine-tunes one model per objective and, for a
preference λ, interpolates their weights. With LoRA adapters on a shared base, interpolating the fine-tuned weights is
mixing the weight changes: `W(λ) = W0 + sum_i lambda_i * B_i A_i * scaling_i`. `RewardedSoup` does exactly that by
activating every objective's adapter at once with its scaling multiplied by `lambda_i`, so the mix acts on each
`ΔW_i` whole, never on `A` and `B` separately, and switching λ touches no weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from peft import PeftModel
from peft.tuners.lora import LoraLayer

from .preference import PreferenceLike, validate_preference


class RewardedSoup:
    """A PEFT model holding one LoRA adapter per objective (adapter name = objective name), steered by λ.

    Args:
        model: A `PeftModel` with a LoRA adapter named after each objective.
        objectives: The objective names, in preference order.

    Raises:
        ValueError: If an objective has no adapter of that name.
    """

    def __init__(self, model: PeftModel, objectives: Sequence[str]) -> None:
        missing = [name for name in objectives if name not in model.peft_config]
        if missing:
            raise ValueError(
                f"Rewarded Soups needs one LoRA adapter per objective named after it, but {missing} are missing; "
                f"the model has {sorted(model.peft_config)}."
            )
        self.model = model
        self.objectives = list(objectives)
        self.model.base_model.set_adapter(self.objectives)
        self._layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
        self._preference = validate_preference([1.0 / len(self.objectives)] * len(self.objectives), len(objectives))
        self.set_preference(self._preference)

    def set_preference(self, preference: PreferenceLike) -> None:
        """Mixes the adapters' weight changes with the weights `preference` (a single vector on the simplex)."""
        values = validate_preference(preference, len(self.objectives), self.objectives)
        if values.dim() != 1:
            raise ValueError("Rewarded Soups mixes one preference at a time; pass a single vector, not one per row.")
        for layer in self._layers:
            for name, weight in zip(self.objectives, values.tolist()):
                layer.set_scale(name, weight)
        self._preference = values

    def get_preference(self) -> Any:
        return self._preference.clone()

    @contextlib.contextmanager
    def preference(self, preference: PreferenceLike) -> Iterator[None]:
        """Sets a preference for a `with` block and restores the previous one on exit."""
        previous = self._preference
        self.set_preference(preference)
        try:
            yield
        finally:
            self.set_preference(previous)

    def disable_adapter(self) -> Any:
        return self.model.disable_adapter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
