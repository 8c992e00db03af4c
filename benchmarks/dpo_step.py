"""One training step of `MultiObjectiveDPOTrainer` against TRL's own `DPOTrainer` with LoRA: time and peak memory.

A Llama-like model built from a config (hidden 512, 4 layers, vocabulary 8192) on the CPU, adapters on q, k, v and o:

- Panacea, rank r and m = 2 objectives, trained by `MultiObjectiveDPOTrainer` on layout 1 (one pair, one label per
  objective);
- a PEFT LoRA of rank r + m, trained by TRL's `DPOTrainer` on the same pairs as `prompt`, `chosen`, `rejected`.

Both start from the same base weights, take the same batch (4 pairs x 128 tokens) and use the base model with the
adapter disabled as the reference. A step is what `Trainer` does per optimizer step: `training_step` (policy forward,
reference forward, backward) then the optimizer step.

Time: both trainers live in one process and their steps run interleaved, one of each per round; the figure is the
median over the rounds after the warm-up rounds.
Memory: each trainer runs its warm-up and steps alone in a fresh subprocess; the figure is that process's peak resident
set size from `resource.getrusage(RUSAGE_SELF).ru_maxrss` (Linux: KiB), both whole and above the resident set size
just before the first step (which isolates the step from the interpreter, the libraries and the model).

The last line printed is a JSON object of the ratios (multi-objective / TRL). Run: `python benchmarks/dpo_step.py`
(about two minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, disable_progress_bar
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

import peft_panacea  # noqa: F401  (registers the PANACEA tuner type)
from peft_panacea import PanaceaConfig
from peft_panacea.trainers import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer

OBJECTIVES = ["helpful", "harmless"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAINERS = ("panacea", "trl")
PAD, EOS = "<pad>", "<eos>"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=4, help="Preference pairs per batch.")
    parser.add_argument("--seq", type=int, default=128, help="Tokens per sequence: half prompt, half completion.")
    parser.add_argument("--rank", type=int, default=8, help="Panacea's r; the LoRA gets r + m.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps of each trainer first.")
    parser.add_argument("--rounds", type=int, default=7, help="Timed steps of each trainer, interleaved.")
    parser.add_argument("--memory-steps", type=int, default=3, help="Steps after the warm-up in a memory run.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps shared cores steady).")
    parser.add_argument("--memory", choices=TRAINERS, help=argparse.SUPPRESS)  # internal: one memory run
    return parser.parse_args()


# --- model, tokenizer, data ---------------------------------------------------------------------------------------


def build_base(args: argparse.Namespace) -> LlamaForCausalLM:
    """The same random weights at every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2 * args.seq,
        pad_token_id=args.vocab - 2,
        eos_token_id=args.vocab - 1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word `w<id>`, plus pad and EOS: every text has an exact token count."""
    words = {f"w{index}": index for index in range(vocab_size - 2)}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([PAD, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=None, eos_token=EOS, pad_token=PAD)


def response_pairs(args: argparse.Namespace) -> Dataset:
    """Layout 1: `seq / 2` prompt tokens, `seq / 2 - 1` completion tokens plus the EOS TRL appends."""
    generator = torch.Generator().manual_seed(1)

    def words(count: int) -> str:
        return " ".join(f"w{index}" for index in torch.randint(args.vocab - 2, (count,), generator=generator).tolist())

    half = args.seq // 2
    rows = [
        {
            "prompt": words(half),
            "response_0": " " + words(half - 1),
            "response_1": " " + words(half - 1),
            "helpful_response_id": row % 2,
            "harmless_response_id": (row + 1) % 2,
        }
        for row in range(2 * args.pairs)
    ]
    return Dataset.from_list(rows)


# --- trainers -----------------------------------------------------------------------------------------------------


def build_trainer(kind: str, args: argparse.Namespace, output_dir: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """A trainer with its optimizer, and its first batch of `args.pairs` pairs."""
    tokenizer = build_tokenizer(args.vocab)
    pairs = response_pairs(args)
    common = {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.pairs,
        "max_steps": args.warmup + args.rounds,
        "learning_rate": 1e-4,
        "max_length": args.seq,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    if kind == "panacea":
        trainer = MultiObjectiveDPOTrainer(
            build_base(args),
            args=MultiObjectiveDPOConfig(objectives=OBJECTIVES, **common),
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=PanaceaConfig(
                r=args.rank,
                preference_dim=len(OBJECTIVES),
                preference_names=OBJECTIVES,
                target_modules=PROJECTIONS,
                task_type="CAUSAL_LM",
            ),
        )
    else:
        pairs = pairs.rename_columns({"response_0": "chosen", "response_1": "rejected"})
        trainer = DPOTrainer(
            build_base(args),
            args=DPOConfig(**common),
            train_dataset=pairs.select_columns(["prompt", "chosen", "rejected"]),
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=args.rank + len(OBJECTIVES), target_modules=PROJECTIONS, lora_alpha=16, task_type="CAUSAL_LM"
            ),
        )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by `Trainer`'s loop, read by `training_step`
    batch = trainer.data_collator([trainer.train_dataset[row] for row in range(args.pairs)])
    return trainer, batch


def train_step(trainer: Any, batch: dict[str, torch.Tensor]) -> None:
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def trainable_count(trainer: Any) -> int:
    return sum(param.numel() for param in trainer.model.parameters() if param.requires_grad)


def resident_mib() -> float:
    """The current resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


# --- measurements -------------------------------------------------------------------------------------------------


def time_steps(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of each trainer, interleaved, after the warm-up."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainers = {kind: build_trainer(kind, args, output_dir) for kind in TRAINERS}
        first, second = (batch for _, batch in trainers.values())
        for key in ("input_ids", "attention_mask", "completion_mask"):
            if not torch.equal(first[key], second[key]):
                raise RuntimeError(f"The two trainers got different batches (`{key}`).")
        print(
            f"batch {tuple(first['input_ids'].shape)} (chosen and rejected rows), trainable parameters: "
            + ", ".join(f"{kind} {trainable_count(trainer):,}" for kind, (trainer, _) in trainers.items())
        )

        times: dict[str, list[float]] = {kind: [] for kind in TRAINERS}
        for round_index in range(args.warmup + args.rounds):
            for kind, (trainer, batch) in trainers.items():
                start = time.perf_counter()
                train_step(trainer, batch)
                if round_index >= args.warmup:
                    times[kind].append(time.perf_counter() - start)
    for kind, values in times.items():
        print(f"  {kind:8s} step times (s): " + " ".join(f"{value:.3f}" for value in values))
    return {kind: statistics.median(values) for kind, values in times.items()}


def memory_run(kind: str, args: argparse.Namespace) -> dict[str, float]:
    """In this (fresh) process: build one trainer, run its steps, return the peak and pre-step resident sizes."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, batch = build_trainer(kind, args, output_dir)
        before = resident_mib()
        for _ in range(args.warmup + args.memory_steps):
            train_step(trainer, batch)
    return {"trainer": type(trainer).__name__, "peak_mib": peak_mib(), "before_steps_mib": before}


def measure_memory(kind: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory", kind]
    for option in ("hidden", "layers", "vocab", "pairs", "seq", "rank", "warmup", "memory_steps", "threads"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"The memory run of {kind} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.memory is not None:
        print(json.dumps(memory_run(args.memory, args)))
        return

    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}; {args.pairs} pairs x {args.seq} "
        f"tokens; Panacea r={args.rank}, m={len(OBJECTIVES)} vs LoRA r={args.rank + len(OBJECTIVES)} on "
        f"{', '.join(PROJECTIONS)}; torch {torch.__version__}, {args.threads} thread(s)"
    )
    medians = time_steps(args)
    print(
        f"step time (median of {args.rounds}, after {args.warmup} warm-up): "
        f"multi-objective {medians['panacea']:.3f} s, TRL DPO + LoRA {medians['trl']:.3f} s"
    )

    memory = {}
    for kind in TRAINERS:
        memory[kind] = measure_memory(kind, args)
        memory[kind]["step_mib"] = memory[kind]["peak_mib"] - memory[kind]["before_steps_mib"]
    for kind, label in (("panacea", "multi-objective"), ("trl", "TRL DPO + LoRA")):
        figures = memory[kind]
        print(
            f"peak RSS ({label}: {figures['trainer']} in its own process): {figures['peak_mib']:.1f} MiB, "
            f"{figures['step_mib']:.1f} MiB of it above the {figures['before_steps_mib']:.1f} MiB resident before "
            "the first step"
        )

    ratios = {
        "step_time_ratio": round(medians["panacea"] / medians["trl"], 3),
        "peak_memory_ratio": round(memory["panacea"]["peak_mib"] / memory["trl"]["peak_mib"], 3),
        "step_memory_ratio": round(memory["panacea"]["step_mib"] / memory["trl"]["step_mib"], 3),
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
