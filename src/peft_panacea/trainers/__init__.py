"""TRL trainers for Panacea adapters."""

from .dpo import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer, SharedLayersDPOTrainer

__all__ = ["MultiObjectiveDPOConfig", "MultiObjectiveDPOTrainer", "SharedLayersDPOTrainer"]
