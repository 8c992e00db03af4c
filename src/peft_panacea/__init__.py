"""peft-panacea: Panacea (Pareto alignment via preference adaptation) as a PEFT tuner, with TRL trainers.

Importing the package registers the `PANACEA` tuner type with PEFT, so that `get_peft_model`,
`PeftModel.from_pretrained` and `save_pretrained` work with `PanaceaConfig` as with any PEFT method.
"""

from ._registry import register as _register
from .config import PanaceaConfig
from .layer import PanaceaLayer
from .model import PanaceaModel
from .preference import simplex_grid, validate_preference

_register()

__version__ = "0.1.0"

__all__ = ["PanaceaConfig", "PanaceaLayer", "PanaceaModel", "simplex_grid", "validate_preference", "__version__"]
