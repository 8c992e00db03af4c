"""`PanaceaConfig`: the configuration of a Panacea adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ._registry import panacea_peft_type

INIT_FACTORS = ("gaussian", "orthogonal")


@dataclass
class PanaceaConfig(PeftConfig):
    """Configuration of a Panacea adapter: an SVD-LoRA whose diagonal holds learned singular values and the preference.

    Paper: "Panacea: Pareto Alignment via Preference Adaptation for LLMs", https://arxiv.org/abs/2402.02030.

    Every adapted linear layer computes `h = W0 x + (lora_alpha / r) * B diag(sigma, s * lambda) A x` with
    `A: (r + m, in)`, `B: (out, r + m)`, learned singular values `sigma: (r,)`, a learned preference scale `s` (a
    scalar, or one per objective) and the preference `lambda: (m,)` set at run time with `set_preference`. `sigma`
    and `s` start at 0, so a new adapter leaves the model's output unchanged at any preference.

    Args:
        r (`int`): Number of learned singular values (the rank shared by all objectives). Positive.
        preference_dim (`int`): Number of objectives `m`, the length of every preference vector. Positive.
        preference_names (`list[str]`, *optional*): One unique name per objective, e.g. `["helpful", "harmless"]`;
            lets `set_preference` take a dict and names the objectives in logs and model cards.
        target_modules (`list[str] | str`, *optional*): Module names (or a regex) to adapt; `"all-linear"` adapts
            every linear layer but the output head. Defaults to LoRA's choice for the architecture.
        exclude_modules (`list[str] | str`, *optional*): Module names (or a regex) never to adapt.
        lora_alpha (`float`): Scaling numerator; the adapter output is multiplied by `lora_alpha / r`. Positive.
        lora_dropout (`float`): Dropout on the adapter's input, in `[0, 1)`.
        init_factors (`str`): How `A` and `B` start: `"gaussian"` draws every entry from N(0, `init_std`^2);
            `"orthogonal"` makes the rows of `A` and the columns of `B` orthonormal and then scales them by
            `init_std * sqrt(fan)` so both choices have entries of about the same size.
        init_std (`float`): Standard deviation of the initial factors. Positive.
        per_objective_scale (`bool`): Learn one preference scale per objective, shape `(m,)`, instead of one scalar.
        fan_in_fan_out (`bool`): True when the target layer stores its weight as `(in, out)` (GPT-2's `Conv1D`).
            Set automatically for `Conv1D`.
        bias (`str`): Which biases to train: `"none"`, `"all"` or `"panacea_only"`.
        modules_to_save (`list[str]`, *optional*): Other modules to train and save with the adapter.
        layers_to_transform (`list[int] | int`, *optional*): Only adapt the layers with these indices.
        layers_pattern (`list[str] | str`, *optional*): Name of the `nn.ModuleList` holding the layers
            (`"layers"`, `"h"`), used with `layers_to_transform`.
        init_weights (`bool`): Initialise as described above. False draws `sigma` and `s` at random too, which
            makes the adapter differ from the identity (for tests only).

    Raises:
        ValueError: For a non-positive `r`, `preference_dim`, `lora_alpha` or `init_std`, a dropout outside
            `[0, 1)`, preference names of the wrong number or with repeats, an unknown `init_factors` or `bias`.
    """

    r: int = field(default=8, metadata={"help": "Number of learned singular values (rank shared by all objectives)."})
    preference_dim: int = field(
        default=2, metadata={"help": "Number of objectives m: the length of every preference vector. At least 1."}
    )
    preference_names: list[str] | None = field(
        default=None,
        metadata={"help": "One unique name per objective (length `preference_dim`), e.g. ['helpful', 'harmless']."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex of the modules to adapt, e.g. ['q_proj', 'v_proj']; 'all-linear' for "
            "every linear layer but the output head. Defaults to LoRA's choice for the architecture."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    lora_alpha: float = field(
        default=16, metadata={"help": "Scaling numerator: the adapter output is multiplied by lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    init_factors: str = field(
        default="gaussian",
        metadata={"help": "Initial A and B: 'gaussian' (N(0, init_std^2)) or 'orthogonal' (orthonormal, rescaled)."},
    )
    init_std: float = field(default=0.02, metadata={"help": "Standard deviation of the initial A and B entries."})
    per_objective_scale: bool = field(
        default=False, metadata={"help": "Learn one preference scale per objective instead of a single scalar."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the target layer stores its weight as (in, out), as Conv1D."}
    )
    bias: str = field(default="none", metadata={"help": "Biases to train: 'none', 'all' or 'panacea_only'."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules to train and save with the adapter."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, used with layers_to_transform."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Start as the identity (sigma = s = 0). False is for tests only."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = panacea_peft_type()

        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

        self._check_positive("r", self.r, integer=True)
        self._check_positive("preference_dim", self.preference_dim, integer=True)
        self._check_positive("lora_alpha", self.lora_alpha)
        self._check_positive("init_std", self.init_std)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), but got {self.lora_dropout}.")
        if self.init_factors not in INIT_FACTORS:
            raise ValueError(f"`init_factors` must be one of {INIT_FACTORS}, but got {self.init_factors!r}.")
        if self.bias not in ("none", "all", "panacea_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'panacea_only', but got {self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`: give both, or neither.")

        if self.preference_names is not None:
            names = list(self.preference_names)
            if len(names) != self.preference_dim or len(set(names)) != len(names):
                raise ValueError(
                    f"`preference_names` must hold {self.preference_dim} unique names (one per objective, "
                    f"`preference_dim={self.preference_dim}`), but got {names}."
                )
            if not all(isinstance(name, str) and name for name in names):
                raise ValueError(f"`preference_names` must be non-empty strings, but got {names}.")
            self.preference_names = names

    @staticmethod
    def _check_positive(name: str, value: float, integer: bool = False) -> None:
        if integer and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"`{name}` must be an integer, but got {type(value).__name__} {value!r}.")
        if not value > 0:
            raise ValueError(f"`{name}` must be positive, but got {value}.")
