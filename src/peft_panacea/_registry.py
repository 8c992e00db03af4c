"""Registration of the Panacea tuner with PEFT.

PEFT finds a tuner by its `PeftType`: `register_peft_method` accepts only names that the `PeftType` enum already has,
and `PeftConfig.from_pretrained` reads `"peft_type": "PANACEA"` back through the same enum. PEFT gives no public way
to add a member, so this module adds `PeftType.PANACEA` once, by hand, with the enum's own bookkeeping (the member
map, the value map and the name list), and then registers the config and model classes under it. Importing
`peft_panacea` runs it; running it twice is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType
from peft.utils import register_peft_method as _register_peft_method

PANACEA = "PANACEA"
PANACEA_PREFIX = "panacea_"


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]

    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def panacea_peft_type() -> PeftType:
    """`PeftType.PANACEA`, added to the enum on first use."""
    return _add_peft_type_member(PANACEA)


def register() -> None:
    """Adds `PeftType.PANACEA` and registers `PanaceaConfig` and `PanaceaModel` with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import PanaceaConfig
    from .model import PanaceaModel

    if panacea_peft_type() in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    _register_peft_method(
        name=PANACEA.lower(), config_cls=PanaceaConfig, model_cls=PanaceaModel, prefix=PANACEA_PREFIX
    )
