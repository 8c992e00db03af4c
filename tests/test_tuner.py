"""The Panacea tuner in memory: injection, identity at init, preference steering, generation, merging, gradients,
dtypes and bad input, over a matrix of tiny models x configs."""

from __future__ import annotations

import math

import pytest
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import peft_panacea
from peft_panacea import PanaceaConfig, PanaceaModel, simplex_grid

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["helpful", "harmless"]

# (tiny model, config kwargs, names of the modules that must be adapted)
MATRIX = [
    pytest.param("llama", {}, {"q_proj", "v_proj"}, id="llama-default"),
    pytest.param("llama", {"target_modules": LLAMA_PROJECTIONS}, set(LLAMA_PROJECTIONS), id="llama-seven"),
    pytest.param("llama", {"target_modules": "all-linear"}, set(LLAMA_PROJECTIONS), id="llama-all-linear"),
    pytest.param(
        "llama", {"preference_dim": 3, "per_objective_scale": True}, {"q_proj", "v_proj"}, id="llama-m3-per-obj"
    ),
    pytest.param(
        "llama",
        {"preference_dim": 10, "init_factors": "orthogonal", "target_modules": ["o_proj", "down_proj"]},
        {"o_proj", "down_proj"},
        id="llama-m10-orthogonal",
    ),
    pytest.param("gpt2", {}, {"c_attn"}, id="gpt2-default"),
    pytest.param("gpt2", {"target_modules": "all-linear"}, {"c_attn", "c_proj", "c_fc"}, id="gpt2-all-linear"),
    pytest.param("gpt2", {"preference_dim": 3, "lora_dropout": 0.1}, {"c_attn"}, id="gpt2-m3-dropout"),
]
MODELS = ["llama", "gpt2"]


def preference_dim(config_kwargs: dict) -> int:
    return config_kwargs.get("preference_dim", 2)


def base_state(model) -> dict[str, torch.Tensor]:
    """Clones of every base-model tensor of a PEFT model (everything that is not a Panacea tensor)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if "panacea_" not in name}


# --- registration and injection --------------------------------------------------------------------------------------


def test_import_registers_the_tuner():
    assert PeftType.PANACEA == "PANACEA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PANACEA] is PanaceaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PANACEA] is PanaceaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.PANACEA] == "panacea_"
    assert PanaceaConfig().peft_type is PeftType.PANACEA

    peft_panacea._register()  # a second registration changes nothing
    assert list(PeftType.__members__).count("PANACEA") == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PANACEA] is PanaceaModel


@pytest.mark.parametrize("model_name, config_kwargs, expected", MATRIX)
def test_injection_adapts_the_targets_and_trains_only_the_adapter(tiny, model_name, config_kwargs, expected):
    model = tiny.panacea(model_name, **config_kwargs)
    config = model.peft_config["default"]
    r, m = config.r, config.preference_dim
    layers = tiny.layers(model)

    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module in layers}
    assert adapted == expected
    assert isinstance(model.base_model, PanaceaModel)

    expected_count = 0
    for layer in layers:
        base = layer.get_base_layer()
        assert layer.fan_in_fan_out == isinstance(base, Conv1D)
        assert layer.panacea_A["default"].shape == (r + m, layer.in_features)
        assert layer.panacea_B["default"].shape == (layer.out_features, r + m)
        assert layer.panacea_sigma["default"].shape == (r,)
        assert layer.panacea_scale["default"].shape == ((m,) if config.per_objective_scale else (1,))
        expected_count += (
            (r + m) * (layer.in_features + layer.out_features) + r + layer.panacea_scale["default"].numel()
        )

    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert trainable, "the adapter has no trainable parameter"
    assert all("panacea_" in name for name in trainable), sorted(trainable)
    assert sum(param.numel() for param in trainable.values()) == expected_count
    assert len(trainable) == 4 * len(layers)
    assert all(not buffer.requires_grad for buffer in model.buffers())


def test_gpt2_targets_conv1d_by_default(tiny):
    model = tiny.panacea("gpt2")

    layers = tiny.layers(model)
    assert len(layers) == 2
    assert all(isinstance(layer.get_base_layer(), Conv1D) and layer.fan_in_fan_out for layer in layers)
    assert model.peft_config["default"].target_modules == {"c_attn"}


# --- identity at init and the affine weight change -------------------------------------------------------------------


@pytest.mark.parametrize("model_name, config_kwargs, expected", MATRIX)
def test_identity_at_init_at_any_preference(tiny, model_name, config_kwargs, expected):
    m = preference_dim(config_kwargs)
    input_ids = tiny.inputs(batch=3)
    base_logits = tiny.logits(tiny.base(model_name), input_ids)
    model = tiny.panacea(model_name, **config_kwargs)

    for preference in [torch.eye(m)[0], torch.eye(m)[-1], torch.full((m,), 1.0 / m), tiny.preferences(3, m)]:
        model.set_preference(preference)
        assert torch.equal(tiny.logits(model, input_ids), base_logits)


@pytest.mark.parametrize("model_name, config_kwargs, expected", MATRIX)
def test_delta_weight_is_affine_in_the_preference(tiny, model_name, config_kwargs, expected):
    m = preference_dim(config_kwargs)
    model = tiny.panacea(model_name, init_weights=False, **config_kwargs)
    tiny.randomize(model)
    first, second = tiny.preferences(2, m, seed=3)
    t = 0.3

    def deltas(preference: torch.Tensor) -> list[torch.Tensor]:
        model.set_preference(preference)
        return [layer.get_delta_weight("default").detach() for layer in tiny.layers(model)]

    deltas_first, deltas_second = deltas(first), deltas(second)
    deltas_mixed = deltas(t * first + (1 - t) * second)
    for delta_first, delta_second, delta_mixed in zip(deltas_first, deltas_second, deltas_mixed):
        assert not torch.allclose(delta_first, delta_second)
        assert_close(delta_mixed, t * delta_first + (1 - t) * delta_second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_delta_weight_is_scaling_times_b_diag_a(tiny, model_name):
    model = tiny.panacea(model_name, r=3, lora_alpha=6, per_objective_scale=True, nonzero=True)
    preference = torch.tensor([0.25, 0.75])
    model.set_preference(preference)

    for layer in tiny.layers(model):
        A, B = layer.panacea_A["default"], layer.panacea_B["default"]
        diagonal = torch.cat([layer.panacea_sigma["default"], layer.panacea_scale["default"] * preference])
        expected = (6 / 3) * B @ torch.diag(diagonal) @ A  # (out, in)
        if layer.fan_in_fan_out:
            expected = expected.T
        assert_close(layer.get_delta_weight("default"), expected, atol=1e-6, rtol=1e-5)


# --- setting the preference -----------------------------------------------------------------------------------------


def test_set_preference_accepts_every_documented_form(tiny):
    model = tiny.panacea("llama", preference_names=NAMES, nonzero=True)
    input_ids = tiny.inputs(batch=2)
    expected = torch.tensor([0.8, 0.2])

    model.set_preference([0.8, 0.2])
    reference = tiny.logits(model, input_ids)
    for form in [(0.8, 0.2), torch.tensor([0.8, 0.2], dtype=torch.float64), {"harmless": 0.2, "helpful": 0.8}]:
        model.set_preference([0.5, 0.5])
        model.set_preference(form)
        assert torch.equal(model.get_preference(), expected)
        assert model.get_preference().dtype == torch.float32
        assert torch.equal(tiny.logits(model, input_ids), reference)

    model.set_preference([1, 0])  # integers are numbers too
    assert torch.equal(model.get_preference(), torch.tensor([1.0, 0.0]))

    rows = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    model.set_preference(rows)
    assert torch.equal(model.get_preference(), rows)
    assert model.get_preference().shape == (2, 2)


@pytest.mark.parametrize("num_objectives", [2, 3, 10])
@pytest.mark.parametrize("model_name", MODELS)
def test_per_row_preference_matches_each_row_alone(tiny, model_name, num_objectives):
    model = tiny.panacea(model_name, preference_dim=num_objectives, nonzero=True, target_modules="all-linear")
    rows = tiny.preferences(4, num_objectives, seed=5)
    input_ids = tiny.inputs(batch=4)

    model.set_preference(rows)
    batched = tiny.logits(model, input_ids)

    for i, preference in enumerate(rows):
        model.set_preference(preference)
        assert_close(batched[i], tiny.logits(model, input_ids[i : i + 1])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_objectives", [2, 3, 10])
@pytest.mark.parametrize("model_name", MODELS)
def test_different_preferences_give_different_outputs(tiny, model_name, num_objectives):
    model = tiny.panacea(model_name, preference_dim=num_objectives, nonzero=True)
    vertices = torch.eye(num_objectives)
    input_ids = tiny.inputs(batch=1).expand(num_objectives, -1)

    model.set_preference(vertices)
    logits = tiny.logits(model, input_ids)

    for i in range(num_objectives):
        for j in range(i + 1, num_objectives):
            assert (logits[i] - logits[j]).abs().max() > 1e-2, (i, j)


# --- generation with one preference per row -------------------------------------------------------------------------

GENERATION_KWARGS = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}


def generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **GENERATION_KWARGS, **kwargs
    )


@pytest.mark.parametrize("model_name", MODELS)
def test_per_row_preference_survives_beam_search(tiny, model_name):
    model = tiny.panacea(model_name, nonzero=True, target_modules="all-linear")
    prompt = tiny.inputs(batch=1, seq=5)
    input_ids = prompt.expand(2, -1)  # the same prompt twice: only the preference tells the rows apart
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    beams = {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}

    model.set_preference(rows)
    batched = generate(model, input_ids, **beams)  # (2 * 2, 5 + 6)

    alone = []
    for preference in rows:
        model.set_preference(preference)
        alone.append(generate(model, prompt, **beams))  # (2, 5 + 6)
    assert not torch.equal(alone[0], alone[1]), "the preference does not change the generations"
    assert torch.equal(batched, torch.cat(alone))


@pytest.mark.parametrize("model_name", MODELS)
def test_per_row_preference_survives_sampling_with_several_sequences(tiny, model_name):
    """Each sampled sequence's step logits equal a plain forward of that sequence at its prompt's preference."""
    model = tiny.panacea(model_name, nonzero=True, target_modules="all-linear")
    input_ids = tiny.inputs(batch=1, seq=5).expand(2, -1)
    rows = torch.tensor([[0.9, 0.1], [0.0, 1.0]])
    copies = 3

    model.set_preference(rows)
    torch.manual_seed(0)
    output = generate(
        model, input_ids, do_sample=True, num_return_sequences=copies, output_logits=True, return_dict_in_generate=True
    )
    step_logits = torch.stack(output.logits, dim=1)  # (2 * copies, new tokens, vocab)
    assert not torch.allclose(step_logits[0, 0], step_logits[copies, 0])  # same prompt, different preference

    for row, sequence in enumerate(output.sequences):
        model.set_preference(rows[row // copies])
        logits = tiny.logits(model, sequence[None])[0]  # (5 + 6, vocab)
        assert_close(step_logits[row], logits[4:-1], atol=1e-4, rtol=1e-4)


def test_generate_expands_rows_only_while_generating(tiny):
    model = tiny.panacea("llama", nonzero=True)
    layers = tiny.layers(model)
    seen = []
    layers[0].register_forward_pre_hook(lambda layer, args: seen.append(layer.expand_preference_rows))

    model.set_preference(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    generate(model, tiny.inputs(batch=2, seq=4), do_sample=False, num_beams=2)
    assert seen and all(seen)
    assert not any(layer.expand_preference_rows for layer in layers)

    model.set_preference(tiny.preferences(3, 2))
    with pytest.raises(ValueError, match="3 rows, but the input batch has 2 rows"):
        generate(model, tiny.inputs(batch=2, seq=4), do_sample=False)
    assert not any(layer.expand_preference_rows for layer in layers)

    with pytest.raises(ValueError, match="3 rows, but the input batch has 6 rows"):
        tiny.logits(model, tiny.inputs(batch=6))  # outside `generate`, rows are never repeated silently


# --- scoped preference and base weights -----------------------------------------------------------------------------


def test_preference_context_restores_the_previous_preference(tiny):
    model = tiny.panacea("llama", preference_names=NAMES, nonzero=True)
    input_ids = tiny.inputs(batch=2)
    model.set_preference([0.9, 0.1])
    outside = tiny.logits(model, input_ids)

    with model.preference({"helpful": 0.2, "harmless": 0.8}):
        assert torch.equal(model.get_preference(), torch.tensor([0.2, 0.8]))
        inside = tiny.logits(model, input_ids)
        with model.preference(torch.tensor([[1.0, 0.0], [0.0, 1.0]])):
            assert model.get_preference().shape == (2, 2)
        assert torch.equal(model.get_preference(), torch.tensor([0.2, 0.8]))
    assert torch.equal(model.get_preference(), torch.tensor([0.9, 0.1]))
    assert torch.equal(tiny.logits(model, input_ids), outside)
    assert not torch.allclose(inside, outside)

    rows = torch.tensor([[0.5, 0.5], [0.3, 0.7]])
    model.set_preference(rows)
    with pytest.raises(RuntimeError, match="inside"), model.preference([0.0, 1.0]):
        raise RuntimeError("inside")
    assert torch.equal(model.get_preference(), rows)

    with pytest.raises(ValueError, match="sum to 1"), model.preference([0.5, 0.6]):
        pass
    assert torch.equal(model.get_preference(), rows)


def test_switching_the_preference_never_touches_base_weights(tiny):
    model = tiny.panacea("llama", nonzero=True, target_modules="all-linear", dtype=torch.bfloat16)
    before = base_state(model)
    input_ids = tiny.inputs(batch=2)

    for i, preference in enumerate(simplex_grid(2, 0.05) * 3):
        model.set_preference(preference)
        if i % 10 == 0:
            tiny.logits(model, input_ids)
            model.set_preference(tiny.preferences(2, 2, seed=i))
            with model.preference([0.5, 0.5]):
                tiny.logits(model, input_ids)

    after = base_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- merging ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name, config_kwargs, expected", MATRIX)
def test_merge_unmerge_and_unload_match_the_unmerged_output(tiny, model_name, config_kwargs, expected):
    m = preference_dim(config_kwargs)
    model = tiny.panacea(model_name, nonzero=True, **config_kwargs)
    model.set_preference(tiny.preferences(1, m, seed=2)[0])
    input_ids = tiny.inputs(batch=2)
    unmerged = tiny.logits(model, input_ids)

    model.merge()
    assert all(layer.merged for layer in tiny.layers(model))
    assert_close(tiny.logits(model, input_ids), unmerged, atol=1e-4, rtol=0)

    model.unmerge()
    assert not any(layer.merged for layer in tiny.layers(model))
    assert_close(tiny.logits(model, input_ids), unmerged, atol=1e-5, rtol=0)

    merged = model.merge_and_unload()
    assert not tiny.layers(merged)
    assert_close(tiny.logits(merged, input_ids), unmerged, atol=1e-4, rtol=0)


def test_merge_refuses_a_per_row_preference(tiny):
    model = tiny.panacea("llama", nonzero=True)
    before = base_state(model)
    model.set_preference(torch.tensor([[0.8, 0.2], [0.1, 0.9]]))

    with pytest.raises(ValueError, match=r"per-row preference of shape \(2, 2\)"):
        model.merge()
    with pytest.raises(ValueError, match="per-row preference"):
        model.merge_and_unload()
    assert not any(layer.merged for layer in tiny.layers(model))
    assert all(torch.equal(before[name], tensor) for name, tensor in base_state(model).items())


def test_set_preference_while_merged_raises(tiny):
    model = tiny.panacea("llama", nonzero=True)
    model.set_preference([0.7, 0.3])
    model.merge()

    with pytest.raises(ValueError, match=r"merged into the base weights.*unmerge"):
        model.set_preference([0.5, 0.5])
    with pytest.raises(ValueError, match="merged into the base weights"), model.preference([0.5, 0.5]):
        pass
    assert torch.equal(model.get_preference(), torch.tensor([0.7, 0.3]))

    model.unmerge()
    model.set_preference([0.5, 0.5])
    assert torch.equal(model.get_preference(), torch.tensor([0.5, 0.5]))


def test_merge_cycles_leave_base_weights_unchanged(tiny):
    model = tiny.panacea("llama", nonzero=True, target_modules="all-linear")
    before = base_state(model)

    for i, preference in enumerate(simplex_grid(2, 0.05)[:20]):
        model.set_preference(preference)
        model.merge(safe_merge=i % 2 == 0)
        model.unmerge()

    after = base_state(model)
    for name in before:
        assert_close(after[name], before[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name", MODELS)
def test_disable_adapter_gives_the_base_output(tiny, model_name):
    input_ids = tiny.inputs(batch=2)
    base_logits = tiny.logits(tiny.base(model_name), input_ids)
    model = tiny.panacea(model_name, nonzero=True, target_modules="all-linear")
    model.set_preference(torch.tensor([[0.8, 0.2], [0.1, 0.9]]))

    with model.disable_adapter():
        assert torch.equal(tiny.logits(model, input_ids), base_logits)
    assert not torch.allclose(tiny.logits(model, input_ids), base_logits)

    model.set_preference([0.3, 0.7])
    model.merge()
    with model.disable_adapter():
        assert_close(tiny.logits(model, input_ids), base_logits, atol=1e-5, rtol=0)


# --- gradients -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("model_name", MODELS)
def test_gradient_checkpointing_reaches_every_adapter_tensor(tiny, model_name, use_reentrant):
    model = tiny.panacea(model_name, nonzero=True, target_modules="all-linear", per_objective_scale=True)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())

    input_ids = tiny.inputs(batch=2)
    model.set_preference(torch.tensor([[0.6, 0.4], [0.3, 0.7]]))
    model(input_ids=input_ids, labels=input_ids).loss.backward()

    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert len(trainable) == 4 * len(tiny.layers(model))
    for name, param in trainable.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


# --- dtypes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_name", MODELS)
def test_dtypes(tiny, model_name, dtype, autocast_adapter_dtype):
    input_ids = tiny.inputs(batch=2)
    base_logits = tiny.logits(tiny.base(model_name, dtype=dtype), input_ids)
    model = tiny.panacea(
        model_name, dtype=dtype, target_modules="all-linear", autocast_adapter_dtype=autocast_adapter_dtype
    )

    adapter_dtype = torch.float32 if autocast_adapter_dtype else dtype
    for name, param in model.named_parameters():
        assert param.dtype == (adapter_dtype if "panacea_" in name else dtype), name
    model.set_preference([0.3, 0.7])
    assert torch.equal(tiny.logits(model, input_ids), base_logits)

    tiny.randomize(model)
    model.set_preference(torch.tensor([[0.3, 0.7], [1.0, 0.0]]))
    logits = tiny.logits(model, input_ids)
    assert logits.dtype == base_logits.dtype
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, base_logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_a_low_precision_base_does_not_round_the_preference(tiny, dtype, autocast_adapter_dtype):
    model = tiny.panacea("gpt2", preference_dim=3, dtype=dtype, autocast_adapter_dtype=autocast_adapter_dtype)

    assert torch.equal(model.get_preference(), torch.full((3,), 1.0 / 3))  # not the bfloat16 0.333984375
    with model.preference([0.2, 0.3, 0.5]):  # restoring the centre on exit validates it
        pass
    assert torch.equal(model.get_preference(), torch.full((3,), 1.0 / 3))


@pytest.mark.parametrize(
    "cast", [lambda model: model.to(torch.bfloat16), lambda model: model.half()], ids=["bf16", "half"]
)
def test_casting_the_model_moves_the_preference_without_rounding_it(tiny, cast):
    model = tiny.panacea("llama", preference_dim=3, nonzero=True)
    model.set_preference([0.2, 0.3, 0.5])

    cast(model)
    assert torch.equal(model.get_preference(), torch.tensor([0.2, 0.3, 0.5]))
    with model.preference([0.1, 0.1, 0.8]):  # restoring on exit validates the kept preference
        assert torch.isfinite(tiny.logits(model, tiny.inputs(batch=2))).all()
    assert torch.equal(model.get_preference(), torch.tensor([0.2, 0.3, 0.5]))
    assert all(layer.panacea_preference["default"].dtype == torch.float32 for layer in tiny.layers(model))


# --- several adapters ------------------------------------------------------------------------------------------------


def test_several_named_adapters(tiny):
    model = tiny.panacea("llama", nonzero=True, target_modules="all-linear")
    input_ids = tiny.inputs(batch=2)
    model.set_preference([0.6, 0.4])
    default_logits = tiny.logits(model, input_ids)

    # adapter names that are also module names of the model
    model.add_adapter("q_proj", PanaceaConfig(r=2, preference_dim=3, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("layers", PanaceaConfig(r=4, preference_dim=2, target_modules=["o_proj"]))
    tiny.randomize(model, seed=7, adapter_name="q_proj")
    assert torch.equal(tiny.logits(model, input_ids), default_logits)  # still only "default" active

    model.set_preference([0.2, 0.3, 0.5], adapter_name="q_proj")  # an inactive adapter
    assert torch.equal(model.get_preference("q_proj"), torch.tensor([0.2, 0.3, 0.5]))
    assert torch.equal(model.get_preference(), torch.tensor([0.6, 0.4]))
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(batch, 3\).*got shape \(2,\)"):
        model.set_preference([0.5, 0.5], adapter_name="q_proj")

    model.set_adapter("q_proj")
    assert model.active_adapters == ["q_proj"]
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(name.endswith(".q_proj") for name in trainable)
    q_proj_logits = tiny.logits(model, input_ids)
    assert not torch.allclose(q_proj_logits, default_logits)
    model.set_preference(torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    assert_close(tiny.logits(model, input_ids)[0], q_proj_logits[0], atol=1e-5, rtol=0)

    model.set_adapter("layers")
    assert torch.equal(tiny.logits(model, input_ids), tiny.logits(tiny.base("llama"), input_ids))  # at init

    model.set_adapter("default")
    model.delete_adapter("q_proj")
    assert set(model.peft_config) == {"default", "layers"}
    assert all("q_proj" not in layer.panacea_A for layer in tiny.layers(model))
    assert torch.equal(tiny.logits(model, input_ids), default_logits)
    with pytest.raises(ValueError, match=r"Unknown adapter `q_proj`"):
        model.set_preference([0.5, 0.5], adapter_name="q_proj")


# --- bad input -------------------------------------------------------------------------------------------------------

BAD_PREFERENCES = [
    pytest.param(
        [0.5, 0.3, 0.2], ValueError, r"shape \(2,\) or \(batch, 2\).*\['helpful', 'harmless'\].*\(3,\)", id="long"
    ),
    pytest.param([1.0], ValueError, r"shape \(2,\) or \(batch, 2\).*got shape \(1,\)", id="short"),
    pytest.param(torch.ones(2, 3) / 3, ValueError, r"\(batch, 2\).*got shape \(2, 3\)", id="rows-wrong-width"),
    pytest.param(torch.zeros(0, 2), ValueError, "zero rows", id="no-rows"),
    pytest.param([1.5, -0.5], ValueError, r"non-negative.*got \[1.5, -0.5\]", id="negative"),
    pytest.param([math.nan, 1.0], ValueError, r"finite.*got \[nan, 1.0\]", id="nan"),
    pytest.param([math.inf, 0.0], ValueError, r"finite.*got \[inf, 0.0\]", id="inf"),
    pytest.param([0.5, 0.4], ValueError, r"sum to 1 \(within 0.0001\), but its sum is 0.899", id="sum"),
    pytest.param(torch.tensor([[0.5, 0.5], [0.5, 0.6]]), ValueError, r"sum to 1 .*\[1.0, 1.1", id="row-sum"),
    pytest.param({"helpful": 0.5, "funny": 0.5}, ValueError, r"unknown names \['funny'\]", id="unknown-name"),
    pytest.param({"helpful": 1.0}, ValueError, r"missing names \['harmless'\]", id="missing-name"),
    pytest.param("0.5,0.5", TypeError, r"list, tuple, dict or tensor of 2 weights, but got str", id="str"),
    pytest.param(0.5, TypeError, r"list, tuple, dict or tensor of 2 weights, but got float", id="scalar"),
    pytest.param([True, False], TypeError, "numbers only", id="bools"),
    pytest.param(torch.tensor([True, False]), TypeError, "real numbers.*torch.bool", id="bool-tensor"),
]


@pytest.mark.parametrize("preference, error, match", BAD_PREFERENCES)
def test_bad_preference_raises_and_keeps_the_previous_one(tiny, preference, error, match):
    model = tiny.panacea("llama", preference_names=NAMES)
    model.set_preference([0.7, 0.3])

    with pytest.raises(error, match=match):
        model.set_preference(preference)
    assert torch.equal(model.get_preference(), torch.tensor([0.7, 0.3]))


def test_dict_preference_needs_preference_names(tiny):
    model = tiny.panacea("llama")

    with pytest.raises(ValueError, match=r"dict, but this adapter has no `preference_names`"):
        model.set_preference({"helpful": 0.5, "harmless": 0.5})


def test_per_row_batch_mismatch_raises_at_forward(tiny):
    model = tiny.panacea("gpt2", nonzero=True)
    model.set_preference(tiny.preferences(3, 2))

    with pytest.raises(ValueError, match=r"per-row preference has 3 rows, but the input batch has 2 rows"):
        tiny.logits(model, tiny.inputs(batch=2))


def test_unknown_adapter_name_raises(tiny):
    model = tiny.panacea("llama")

    with pytest.raises(ValueError, match=r"Unknown adapter `other`; this model has \['default'\]"):
        model.set_preference([0.5, 0.5], adapter_name="other")
    with pytest.raises(ValueError, match="Unknown adapter `other`"):
        model.get_preference("other")


BAD_CONFIGS = [
    pytest.param({"r": 0}, ValueError, r"`r` must be positive, but got 0", id="r-zero"),
    pytest.param({"r": -2}, ValueError, r"`r` must be positive, but got -2", id="r-negative"),
    pytest.param({"r": 2.5}, TypeError, r"`r` must be an integer, but got float 2.5", id="r-float"),
    pytest.param({"preference_dim": 0}, ValueError, r"`preference_dim` must be positive, but got 0", id="m-zero"),
    pytest.param({"lora_alpha": 0}, ValueError, r"`lora_alpha` must be positive, but got 0", id="alpha"),
    pytest.param({"init_std": -0.1}, ValueError, r"`init_std` must be positive", id="init-std"),
    pytest.param({"lora_dropout": 1.0}, ValueError, r"`lora_dropout` must be in \[0, 1\), but got 1.0", id="dropout"),
    pytest.param(
        {"preference_names": ["helpful"]},
        ValueError,
        r"`preference_names` must hold 2 unique names.*but got \['helpful'\]",
        id="names-short",
    ),
    pytest.param(
        {"preference_names": ["helpful", "helpful"]},
        ValueError,
        r"2 unique names.*but got \['helpful', 'helpful'\]",
        id="names-repeated",
    ),
    pytest.param({"preference_names": ["helpful", ""]}, ValueError, "non-empty strings", id="names-empty"),
    pytest.param(
        {"init_factors": "kaiming"},
        ValueError,
        r"`init_factors` must be one of \('gaussian', 'orthogonal'\), but got 'kaiming'",
        id="init-factors",
    ),
    pytest.param({"bias": "lora_only"}, ValueError, r"`bias` must be .*but got 'lora_only'", id="bias"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_CONFIGS)
def test_bad_config_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        PanaceaConfig(**kwargs)
