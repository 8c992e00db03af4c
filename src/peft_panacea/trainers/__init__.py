"""TRL trainers for Panacea adapters."""

from .dpo import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer

__all__ = ["MultiObjectiveDPOConfig", "MultiObjectiveDPOTrainer"]
