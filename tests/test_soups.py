"""Rewarded Soups on a tiny Llama: λ mixes the objectives' LoRA weight changes; a corner is one adapter alone."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_llama

from peft_panacea.soups import RewardedSoup

NAMES = ["helpful", "harmless"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA_ALPHA = 8
RANK = 4


def soup_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A base model and a PEFT model around a copy of it, one LoRA per objective with distinct non-zero factors."""
    base = tiny_llama()
    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=NAMES[0])
    model.add_adapter(NAMES[1], config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    return base.eval(), model


def mixed_weights(base: torch.nn.Module, model: torch.nn.Module, weights: list[float]) -> torch.nn.Module:
    """The base model with `W0 + sum_i weights_i * (lora_alpha / r) * B_i A_i` written into every adapted linear."""
    mixed = copy.deepcopy(base)
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name, linear in mixed.named_modules():
            layer = modules.get(name)
            if layer is None or not hasattr(layer, "lora_A"):
                continue
            for adapter, weight in zip(NAMES, weights):
                delta = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight  # (out, in)
                linear.weight += weight * (LORA_ALPHA / RANK) * delta
    return mixed


@pytest.mark.parametrize("weights", [[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.5, 0.5]])
def test_soup_output_equals_interpolated_weights(weights):
    base, model = soup_model()
    soup = RewardedSoup(model, NAMES)
    inputs = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(1))  # (batch, seq)

    with torch.no_grad(), soup.preference(weights):
        logits = model(input_ids=inputs).logits  # (batch, seq, vocab)
        expected = mixed_weights(base, model, weights)(input_ids=inputs).logits

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_soup_corner_is_that_objective_adapter_alone():
    """At λ = (1, 0) the soup is the `helpful` adapter alone, and not the `harmless` one."""
    _, model = soup_model()
    soup = RewardedSoup(model, NAMES)
    inputs = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        with soup.preference([1.0, 0.0]):
            corner = model(input_ids=inputs).logits
        alone = {}
        for name in NAMES:
            model.base_model.set_adapter(name)
            for layer in soup._layers:
                layer.set_scale(name, 1.0)
            alone[name] = model(input_ids=inputs).logits

    torch.testing.assert_close(corner, alone["helpful"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(corner, alone["harmless"], atol=1e-3)


def test_soup_refuses_missing_adapters_and_per_row_preferences():
    _, model = soup_model()
    with pytest.raises(ValueError, match=r"\['concise'\] are missing"):
        RewardedSoup(model, [*NAMES, "concise"])
    soup = RewardedSoup(model, NAMES)
    with pytest.raises(ValueError, match="one preference at a time"):
        soup.set_preference(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert soup.get_preference().tolist() == [0.5, 0.5]
