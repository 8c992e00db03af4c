"""Shared fixtures: tiny models built from a config (no download), Panacea adapters on them, fresh Python processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

import peft_panacea  # noqa: F401  (registers the PANACEA tuner type)
from peft_panacea import PanaceaConfig, PanaceaLayer

VOCAB_SIZE = 128
SUBPROCESS_TIMEOUT_S = 300

TINY_MODEL_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
TINY_MODEL_CLASSES = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}


class TinyModels:
    """Builds tiny causal LMs and Panacea adapters on them, deterministically from a seed."""

    def base(self, name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
        """A tiny `name` model ("llama" or "gpt2") with random weights, in eval mode."""
        torch.manual_seed(seed)
        model = TINY_MODEL_CLASSES[name](TINY_MODEL_CONFIGS[name]())
        return model.to(dtype).eval()

    def panacea(
        self,
        name: str,
        nonzero: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        autocast_adapter_dtype: bool = True,
        **config_kwargs,
    ) -> PeftModel:
        """A Panacea adapter (`task_type="CAUSAL_LM"`, r=4 unless given) on a tiny model, in eval mode.

        With `nonzero=True` the adapter's factors, singular values and scale are drawn large enough that the
        preference visibly changes the model's output (and its greedy generations).
        """
        config_kwargs.setdefault("r", 4)
        config = PanaceaConfig(task_type="CAUSAL_LM", **config_kwargs)
        base = self.base(name, dtype=dtype, seed=seed)
        model = get_peft_model(base, config, autocast_adapter_dtype=autocast_adapter_dtype)
        if nonzero:
            self.randomize(model, seed=seed + 1)
        return model.eval()

    @staticmethod
    def randomize(model: torch.nn.Module, seed: int = 1, adapter_name: str | None = None) -> None:
        """Draws every Panacea tensor of `adapter_name` (default: all adapters) away from zero."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in TinyModels.layers(model):
                for attribute, std in (("panacea_A", 0.2), ("panacea_B", 0.2), ("panacea_sigma", 1.0)):
                    for name, param in getattr(layer, attribute).items():
                        if adapter_name in (None, name):
                            param.copy_(torch.randn(param.shape, generator=generator) * std)
                for name, param in layer.panacea_scale.items():
                    if adapter_name in (None, name):
                        param.copy_(2.0 + torch.rand(param.shape, generator=generator))

    @staticmethod
    def inputs(batch: int = 3, seq: int = 8, seed: int = 0) -> torch.Tensor:
        """Random token ids `(batch, seq)`, avoiding the special ids 0-2."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, VOCAB_SIZE, (batch, seq), generator=generator)

    @staticmethod
    def preferences(rows: int, num_objectives: int, seed: int = 0) -> torch.Tensor:
        """`rows` random points of the simplex `(rows, m)`, drawn from Dirichlet(1), all entries positive."""
        generator = torch.Generator().manual_seed(seed)
        exponentials = -torch.log(torch.rand(rows, num_objectives, generator=generator).clamp_min(1e-6))
        return exponentials / exponentials.sum(dim=-1, keepdim=True)

    @staticmethod
    @torch.no_grad()
    def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids).logits

    @staticmethod
    def layers(model: torch.nn.Module) -> list[PanaceaLayer]:
        """Every Panacea layer of `model`."""
        return [module for module in model.modules() if isinstance(module, PanaceaLayer)]


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    """Factory of tiny models and Panacea adapters: `tiny.base("llama")`, `tiny.panacea("gpt2", nonzero=True)`."""
    return TinyModels()


@pytest.fixture
def run_python(tmp_path: Path):
    """Runs a Python script in a fresh process (cwd `tmp_path`) and returns its stdout; fails with its stderr.

    `run(script, *args, env={...}, unset=(...))`: `args` become `sys.argv[1:]`, `env` is added to this process's
    environment and the variables named in `unset` are removed from it.
    """

    def run(script: str, *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> str:
        path = tmp_path / "script.py"
        path.write_text(textwrap.dedent(script))
        process_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        for name in unset:
            process_env.pop(name, None)
        completed = subprocess.run(
            [sys.executable, str(path), *args],
            cwd=tmp_path,
            env=process_env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
        if completed.returncode != 0:
            pytest.fail(f"The subprocess failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
        return completed.stdout

    return run
