"""`PanaceaModel`: injects Panacea layers into a model and steers them with a preference vector."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PanaceaConfig
from .layer import Linear, PanaceaLayer
from .preference import PreferenceLike, validate_preference

LORA_WEIGHTS_NAME = "adapter_model.safetensors"


class PanaceaModel(BaseTuner):
    """Adapts a model with Panacea layers: one SVD-LoRA per layer whose diagonal carries the preference vector.

    Paper: "Panacea: Pareto Alignment via Preference Adaptation for LLMs", https://arxiv.org/abs/2402.02030.

    Build it through PEFT, as any other method, after `import peft_panacea`:

    ```py
    >>> import peft_panacea
    >>> from peft import get_peft_model
    >>> from peft_panacea import PanaceaConfig
    >>> config = PanaceaConfig(r=8, preference_dim=2, preference_names=["helpful", "harmless"])
    >>> model = get_peft_model(base_model, config)
    >>> model.set_preference({"helpful": 0.8, "harmless": 0.2})
    >>> with model.preference([0.5, 0.5]):
    ...     outputs = model.generate(**inputs)
    ```

    The preference is a non-persistent buffer of every adapted layer: setting it never touches a weight, and it is
    not saved with the adapter. A new adapter starts at the centre of the simplex.
    """

    prefix: str = "panacea_"
    tuner_layer_cls = PanaceaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # --- injection --------------------------------------------------------------------------------------------------

    def _create_and_replace(
        self,
        config: PanaceaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, PanaceaLayer):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return

        new_module = self._create_new_module(config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: PanaceaConfig, adapter_name: str, target: nn.Module) -> Linear:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(
                f"Panacea adapts `torch.nn.Linear` and `transformers.pytorch_utils.Conv1D` layers, but a target "
                f"module is a `{type(base_layer).__name__}`. Check `target_modules`."
            )
        is_conv_1d = isinstance(base_layer, Conv1D)
        if is_conv_1d != config.fan_in_fan_out:
            # The weight layout is a fact of the layer, not a choice: follow the layer, as LoRA does.
            config.fan_in_fan_out = is_conv_1d
        return Linear(target, adapter_name, config, is_target_conv_1d_layer=is_conv_1d)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PanaceaConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        # PEFT drops every key that contains another adapter's name before this hook, so an adapter named like a
        # module ("q_proj", "layers") would leave the others' checkpoints empty. Select this adapter's tensors by
        # structure, and take from the model those that the name filter removed.
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        selected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        selected.update(_filter_state_dict_by_key_prefixes(state_dict, prefixes))
        selected.update(cls._get_learnable_bias_state_dict(model, state_dict, config))
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PanaceaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        for key, tensor in state_dict.items():
            if key.endswith("panacea_A") or key.endswith("panacea_A.weight"):
                sigma = state_dict.get(key.replace("panacea_A", "panacea_sigma"))
                saved_r = sigma.shape[0] if sigma is not None else config.r
                saved_objectives = tensor.shape[0] - saved_r
                if (saved_r, saved_objectives) != (config.r, config.preference_dim):
                    raise ValueError(
                        f"The saved adapter has `preference_dim={saved_objectives}` and `r={saved_r}`, but the config "
                        f"in use has `preference_dim={config.preference_dim}` and `r={config.r}`. Load it with the "
                        "config saved beside it."
                    )
                break
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # --- preference -------------------------------------------------------------------------------------------------

    def _panacea_layers(self) -> Iterator[PanaceaLayer]:
        return (module for module in self.model.modules() if isinstance(module, PanaceaLayer))

    def _adapter_names(self, adapter_name: str | None) -> list[str]:
        if adapter_name is None:
            return list(self.active_adapters)
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter `{adapter_name}`; this model has {sorted(self.peft_config)}.")
        return [adapter_name]

    def set_preference(self, preference: PreferenceLike, adapter_name: str | None = None) -> None:
        """Sets the preference vector λ of the active adapters (or of `adapter_name`).

        Args:
            preference: One vector for the whole batch (a list, tuple, `(m,)` tensor, or a dict keyed by the
                adapter's `preference_names`), or a `(batch, m)` tensor giving each row of the next batches its own
                preference. Must lie on the simplex; it is never renormalised.
            adapter_name: The adapter to steer; defaults to the active adapters.

        Raises:
            ValueError: If the preference is not a valid point on the simplex for the adapter (see
                `validate_preference`), or if an adapter is merged into the base weights.
            TypeError: If the preference is not made of numbers.
        """
        names = self._adapter_names(adapter_name)
        values = {name: self._validate(preference, name) for name in names}
        layers = list(self._panacea_layers())  # one walk of the model, used twice

        for layer in layers:
            merged = [name for name in layer.merged_adapters if name in values]
            if merged:
                raise ValueError(
                    f"Adapter(s) {merged} are merged into the base weights, so their preference is fixed. Call "
                    "`unmerge()` (or `unmerge_adapter()`) before changing the preference."
                )
        for layer in layers:
            for name, value in values.items():
                if name in layer.panacea_preference:
                    layer.set_preference_tensor(name, value)

    def _validate(self, preference: PreferenceLike, adapter_name: str) -> torch.Tensor:
        config = self.peft_config[adapter_name]
        return validate_preference(preference, config.preference_dim, config.preference_names)

    def get_preference(self, adapter_name: str | None = None) -> torch.Tensor:
        """The current preference of the active adapter (or of `adapter_name`): `(m,)` or `(batch, m)`, float32."""
        name = self._adapter_names(adapter_name)[0]
        for layer in self._panacea_layers():
            if name in layer.panacea_preference:
                return layer.panacea_preference[name].detach().clone().cpu()
        raise ValueError(f"Adapter `{name}` is not a Panacea adapter of any layer of this model.")

    @contextlib.contextmanager
    def preference(self, preference: PreferenceLike, adapter_name: str | None = None) -> Iterator[None]:
        """Sets a preference for the duration of a `with` block and restores the previous one on exit, always."""
        names = self._adapter_names(adapter_name)
        previous = {name: self.get_preference(name) for name in names}
        self.set_preference(preference, adapter_name)
        try:
            yield
        finally:
            for name, value in previous.items():
                self.set_preference(value, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generates with the base model; a per-row preference follows each prompt into its samples and beams."""
        layers = list(self._panacea_layers())
        for layer in layers:
            layer.expand_preference_rows = True
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            for layer in layers:
                layer.expand_preference_rows = False

    # --- merging and export -----------------------------------------------------------------------------------------

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merges the adapters at their current single preference into the base weights (see `merge_adapter`)."""
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge(self) -> None:
        """Restores the base weights of every merged layer."""
        self.unmerge_adapter()

    def to_lora(
        self,
        save_directory: str | os.PathLike,
        preference: PreferenceLike | None = None,
        adapter_name: str = "default",
    ) -> LoraConfig:
        """Writes the adapter at one fixed preference as a plain PEFT LoRA adapter of rank `r + m`.

        `scaling * B diag(sigma, s * lambda) A` is exactly a LoRA product: `lora_A = A` and
        `lora_B = scaling * B diag(sigma, s * lambda)`, with `lora_alpha = r + m` so that LoRA's own scaling is 1.
        Stock PEFT (and any LoRA server) loads the result without this package.

        Args:
            save_directory: The folder to write `adapter_config.json` and `adapter_model.safetensors` into.
            preference: The preference to bake in; defaults to the adapter's current (single) preference.
            adapter_name: The adapter to export.

        Returns:
            The `LoraConfig` written.

        Raises:
            ValueError: For an unknown adapter, an invalid or per-row preference.
            NotImplementedError: For adapters that train biases or extra modules, which a LoRA file cannot carry.
        """
        config: PanaceaConfig = self.peft_config[self._adapter_names(adapter_name)[0]]
        if config.modules_to_save or config.bias != "none":
            raise NotImplementedError(
                "`to_lora` exports the low-rank weights only; adapters with `modules_to_save` or trained biases "
                f"(`bias={config.bias!r}`) cannot be written as a plain LoRA."
            )
        context = self.preference(preference, adapter_name) if preference is not None else contextlib.nullcontext()

        state_dict: dict[str, torch.Tensor] = {}
        target_modules: list[str] = []
        fan_in_fan_out = False
        with context, torch.no_grad():
            for module_name, layer in self.model.named_modules():
                if not isinstance(layer, PanaceaLayer) or adapter_name not in layer.panacea_A:
                    continue
                if layer.panacea_preference[adapter_name].dim() != 1:
                    raise ValueError(
                        "`to_lora` bakes in one preference, but the adapter holds a per-row preference. Pass "
                        "`preference=[...]` or call `set_preference` with a single vector first."
                    )
                diag = layer._diagonal(adapter_name, batch_size=1, ndim=1)  # (r + m,)
                lora_B = layer.panacea_B[adapter_name] * diag * layer.scaling[adapter_name]  # (out, r + m)
                key = f"base_model.model.{module_name}"
                state_dict[f"{key}.lora_A.weight"] = layer.panacea_A[adapter_name].detach().contiguous().cpu()
                state_dict[f"{key}.lora_B.weight"] = lora_B.detach().contiguous().cpu()
                target_modules.append(module_name)
                fan_in_fan_out = fan_in_fan_out or layer.fan_in_fan_out

        rank = config.r + config.preference_dim
        lora_config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=target_modules,
            fan_in_fan_out=fan_in_fan_out,
            bias="none",
            task_type=config.task_type,
            base_model_name_or_path=config.base_model_name_or_path,
            revision=config.revision,
        )
        os.makedirs(save_directory, exist_ok=True)
        lora_config.save_pretrained(save_directory)
        save_file(state_dict, os.path.join(save_directory, LORA_WEIGHTS_NAME), metadata={"format": "pt"})
        return lora_config
