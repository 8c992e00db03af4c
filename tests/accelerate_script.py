"""Trains a Panacea adapter on the tiny Llama for a few steps and records, on every process, the λ of every step.

Run by `test_dpo_trainer.py` under `accelerate launch --num_processes 2 --cpu accelerate_script.py OUTPUT_DIR`. Each
process writes `OUTPUT_DIR/process-<index>.json` with the number of processes, the preference set on the model at
the end of every training step, and the sum of every adapter tensor after training (the replicas must agree).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from tiny_models import tiny_llama, tiny_tokenizer
from transformers import TrainerCallback

import peft_panacea  # noqa: F401  (registers the PANACEA tuner type)
from peft_panacea import PanaceaConfig
from peft_panacea.trainers import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer

NAMES = ["helpful", "harmless"]
MAX_STEPS = 3
SEED = 7


class PreferenceRecorder(TrainerCallback):
    """Keeps the preference the trainer set on the model for each step."""

    def __init__(self) -> None:
        self.preferences: list[list[float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.preferences.append(model.get_preference().tolist())


def main(output_dir: Path) -> None:
    torch.set_num_threads(1)
    rows = [
        {
            "prompt": f"question {i}",
            "response_0": f" answer {i}",
            "response_1": f" another reply {i}",
            "helpful_response_id": i % 2,
            "harmless_response_id": (i // 2) % 2,
        }
        for i in range(16)
    ]
    args = MultiObjectiveDPOConfig(
        output_dir=str(output_dir / "out"),
        objectives=NAMES,
        per_device_train_batch_size=2,
        max_steps=MAX_STEPS,
        learning_rate=1e-2,
        seed=SEED,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    config = PanaceaConfig(r=4, preference_dim=2, preference_names=NAMES, task_type="CAUSAL_LM")
    trainer = MultiObjectiveDPOTrainer(
        tiny_llama(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer(),
        peft_config=config,
    )
    recorder = PreferenceRecorder()
    trainer.add_callback(recorder)
    trainer.train()

    adapter = {name: param.sum().item() for name, param in trainer.model.named_parameters() if param.requires_grad}
    record = {
        "num_processes": trainer.accelerator.num_processes,
        "preferences": recorder.preferences,
        "adapter": adapter,
    }
    (output_dir / f"process-{trainer.accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
