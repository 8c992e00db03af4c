"""The Panacea layer: an SVD-LoRA whose diagonal holds learned singular values and the preference vector."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from .config import PanaceaConfig
from .preference import uniform_preference


class PanaceaLayer(BaseTunerLayer):
    """Adapter state of one adapted layer, per adapter name.

    Trainable: `panacea_A (r + m, in)`, `panacea_B (out, r + m)`, `panacea_sigma (r,)`, `panacea_scale (1,)` or
    `(m,)`. Not trainable and never saved: `panacea_preference (m,)` or `(rows, m)`, a non-persistent buffer.
    """

    adapter_layer_names = ("panacea_A", "panacea_B", "panacea_sigma", "panacea_scale")
    other_param_names = ("r", "num_objectives", "scaling", "panacea_dropout", "panacea_preference")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_objectives: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.panacea_dropout = nn.ModuleDict({})
        self.panacea_A = nn.ParameterDict({})
        self.panacea_B = nn.ParameterDict({})
        self.panacea_sigma = nn.ParameterDict({})
        self.panacea_scale = nn.ParameterDict({})
        self.panacea_preference = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # True only while `generate` runs: a per-row preference then follows its prompt into the copies that
        # `generate` makes of each row (`num_return_sequences`, beams), which are laid out row by row.
        self.expand_preference_rows = False

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Panacea cannot adapt a layer of type {type(self.get_base_layer()).__name__}.")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: PanaceaConfig, inference_mode: bool = False) -> None:
        """Creates (or recreates) the adapter `adapter_name` on this layer, initialised as `config` says."""
        r, m = config.r, config.preference_dim
        self.r[adapter_name] = r
        self.num_objectives[adapter_name] = m
        self.scaling[adapter_name] = config.lora_alpha / r

        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.panacea_dropout[adapter_name] = dropout

        self.panacea_A[adapter_name] = nn.Parameter(torch.empty(r + m, self.in_features))
        self.panacea_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r + m))
        self.panacea_sigma[adapter_name] = nn.Parameter(torch.zeros(r))
        self.panacea_scale[adapter_name] = nn.Parameter(torch.zeros(m if config.per_objective_scale else 1))
        self.panacea_preference[adapter_name] = uniform_preference(m)

        self.reset_panacea_parameters(adapter_name, config)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_panacea_parameters(self, adapter_name: str, config: PanaceaConfig) -> None:
        """Draws `A` and `B` and zeroes `sigma` and `s`, so that the adapter starts as the identity."""
        A, B = self.panacea_A[adapter_name], self.panacea_B[adapter_name]
        with torch.no_grad():
            if config.init_factors == "orthogonal":
                nn.init.orthogonal_(A).mul_(config.init_std * math.sqrt(A.shape[1]))
                nn.init.orthogonal_(B).mul_(config.init_std * math.sqrt(B.shape[0]))
            else:
                nn.init.normal_(A, std=config.init_std)
                nn.init.normal_(B, std=config.init_std)

            if config.init_weights:
                self.panacea_sigma[adapter_name].zero_()
                self.panacea_scale[adapter_name].zero_()
            else:
                nn.init.normal_(self.panacea_sigma[adapter_name], std=1.0)
                nn.init.normal_(self.panacea_scale[adapter_name], std=1.0)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT moves every adapter tensor to the base layer's device and dtype; the preference follows the device
        # only: rounded to a bfloat16 or float16 base, (1/3, 1/3, 1/3) would leave the simplex.
        preferences = {name: value for name, value in self.panacea_preference.items() if name == adapter_name}
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        self._restore_preferences(preferences)

    def _restore_preferences(self, preferences: dict[str, torch.Tensor]) -> None:
        """Puts the float32 `preferences` back, on the device their buffers were moved to."""
        for adapter_name, preference in preferences.items():
            device = self.panacea_preference[adapter_name].device
            self.panacea_preference[adapter_name] = preference.to(device=device, dtype=torch.float32)

    # --- preference ---------------------------------------------------------------------------------------------

    def set_preference_tensor(self, adapter_name: str, preference: torch.Tensor) -> None:
        """Stores an already validated preference `(m,)` or `(rows, m)` on the adapter's device, in float32."""
        device = self.panacea_A[adapter_name].device
        self.panacea_preference[adapter_name] = preference.to(device=device, dtype=torch.float32)

    def _diagonal(self, adapter_name: str, batch_size: int, ndim: int) -> torch.Tensor:
        """`diag(sigma, s * lambda)` as a vector `(r + m,)`, or `(batch, 1, ..., r + m)` for a per-row preference."""
        sigma = self.panacea_sigma[adapter_name]  # (r,)
        scale = self.panacea_scale[adapter_name]  # (1,) or (m,)
        preference = self.panacea_preference[adapter_name].to(sigma.dtype)  # (m,) or (rows, m)

        if preference.dim() == 1:
            return torch.cat([sigma, scale * preference])  # (r + m,)

        rows = preference.shape[0]
        if rows != batch_size:
            if not (self.expand_preference_rows and batch_size % rows == 0):
                raise ValueError(
                    f"The per-row preference has {rows} rows, but the input batch has {batch_size} rows. "
                    "Give one preference per row of the batch, or a single preference for the whole batch."
                )
            preference = preference.repeat_interleave(batch_size // rows, dim=0)  # (batch, m)

        weighted = scale * preference  # (batch, m)
        diagonal = torch.cat([sigma.expand(batch_size, -1), weighted], dim=-1)  # (batch, r + m)
        return diagonal.view(batch_size, *([1] * (ndim - 2)), diagonal.shape[-1])  # (batch, 1, ..., r + m)

    # --- merging --------------------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`scaling * B diag(sigma, s * lambda) A` at the current single preference, in the base weight's layout.

        Raises:
            ValueError: If the adapter holds a per-row preference, which has no single weight.
        """
        preference = self.panacea_preference[adapter_name]
        if preference.dim() != 1:
            raise ValueError(
                f"Cannot merge adapter `{adapter_name}` with a per-row preference of shape "
                f"{tuple(preference.shape)}: merging bakes in one preference. Call `set_preference` with a single "
                "vector first."
            )
        A = self.panacea_A[adapter_name]  # (r + m, in)
        B = self.panacea_B[adapter_name]  # (out, r + m)
        diagonal = self._diagonal(adapter_name, batch_size=1, ndim=1)  # (r + m,)
        delta = (B * diagonal) @ A * self.scaling[adapter_name]  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.T  # (in, out)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Adds the active adapters' weight change, at their current preference, into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return

        base_layer = self.get_base_layer()
        for adapter_name in adapter_names:
            if adapter_name not in self.panacea_A:
                continue
            delta = self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter `{adapter_name}` gives NaN or infinite weights.")
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtracts every merged adapter's weight change from the base weight."""
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.panacea_A:
                base_layer.weight.data -= self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)


class Linear(nn.Module, PanaceaLayer):
    """A `torch.nn.Linear` (or GPT-2 `Conv1D`) with Panacea adapters."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: PanaceaConfig,
        is_target_conv_1d_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        PanaceaLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        result = self.base_layer(x, *args, **kwargs)  # (batch, ..., out)
        result_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name not in self.panacea_A:
                continue
            A = self.panacea_A[adapter_name]  # (r + m, in)
            B = self.panacea_B[adapter_name]  # (out, r + m)
            dropout = self.panacea_dropout[adapter_name]

            hidden = F.linear(dropout(self._cast_input_dtype(x, A.dtype)), A)  # (batch, ..., r + m)
            hidden = hidden * self._diagonal(adapter_name, batch_size=x.shape[0], ndim=x.dim())  # (batch, ..., r + m)
            result = result + F.linear(hidden, B) * self.scaling[adapter_name]  # (batch, ..., out)
        return result.to(result_dtype)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Linear:
        # `model.to(torch.bfloat16)` and `model.half()` must move the preference, not round it: a rounded λ leaves
        # the simplex (its sum drifts past the tolerance), so keep the float32 values on the new device.
        preferences = dict(self.panacea_preference.items())
        super()._apply(fn, *args, **kwargs)
        self._restore_preferences(preferences)
        return self

    def __repr__(self) -> str:
        return "panacea." + super().__repr__()
