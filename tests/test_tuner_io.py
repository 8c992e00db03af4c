"""Saving, loading, exporting and sharing Panacea adapters: files on disk, fresh processes, stock PEFT, a local Hub."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from peft_panacea import PanaceaConfig

MODELS = ["llama", "gpt2"]
NAMES = ["helpful", "harmless"]
PREFERENCE = [0.3, 0.7]
ROWS = [[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
HUB_ENV_TO_UNSET = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN_PATH")


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> dict[str, dict]:
    """Per tiny model: a saved base model, a saved non-zero Panacea adapter, inputs and the adapter's logits."""
    cases = {}
    for model_name in MODELS:
        root = tmp_path_factory.mktemp(model_name)
        tiny.base(model_name).save_pretrained(root / "base")
        model = tiny.panacea(model_name, nonzero=True, target_modules="all-linear", preference_names=NAMES)
        model.save_pretrained(root / "adapter")

        input_ids = tiny.inputs(batch=3)
        model.set_preference(PREFERENCE)
        logits = tiny.logits(model, input_ids)
        model.set_preference(torch.tensor(ROWS))
        row_logits = tiny.logits(model, input_ids)
        expected = {"input_ids": input_ids, "rows": torch.tensor(ROWS), "logits": logits, "row_logits": row_logits}
        torch.save(expected, root / "expected.pt")
        cases[model_name] = {"root": root, "model": model, "input_ids": input_ids, "logits": logits}
    return cases


def load_base(case: dict) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(case["root"] / "base").eval()


# --- save_pretrained and from_pretrained in this process ------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODELS)
def test_save_pretrained_writes_the_adapter_without_the_preference(tiny, saved, model_name):
    case = saved[model_name]
    adapter_dir = case["root"] / "adapter"
    model = case["model"]

    assert {path.name for path in adapter_dir.iterdir()} == ADAPTER_FILES
    assert "library_name: peft" in (adapter_dir / "README.md").read_text()

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "PANACEA"
    assert (config["r"], config["preference_dim"], config["preference_names"]) == (4, 2, NAMES)
    assert config["fan_in_fan_out"] == (model_name == "gpt2")

    state = load_file(adapter_dir / "adapter_model.safetensors")
    expected_keys = {
        f"{name}.{tensor}"
        for name, module in model.named_modules()
        if module in tiny.layers(model)
        for tensor in ("panacea_A", "panacea_B", "panacea_sigma", "panacea_scale")
    }
    assert set(state) == expected_keys
    assert not any("preference" in key for key in state)


@pytest.mark.parametrize("model_name", MODELS)
def test_from_pretrained_loads_every_key_and_starts_at_the_centre(tiny, saved, model_name):
    case = saved[model_name]
    adapter_dir = case["root"] / "adapter"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_base(case), adapter_dir)
    assert not [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    assert torch.equal(model.get_preference(), torch.tensor([0.5, 0.5]))  # the preference is not saved
    assert not any(param.requires_grad for param in model.parameters())  # loaded for inference

    model.set_preference(PREFERENCE)
    assert torch.equal(tiny.logits(model, case["input_ids"]), case["logits"])

    load_result = model.load_adapter(adapter_dir, adapter_name="again", is_trainable=True)
    assert load_result.missing_keys == [] and load_result.unexpected_keys == []
    model.set_adapter("again")
    assert all("panacea_" in name for name, param in model.named_parameters() if param.requires_grad)
    model.set_preference({"harmless": 0.7, "helpful": 0.3})
    assert torch.equal(tiny.logits(model, case["input_ids"]), case["logits"])


def test_several_named_adapters_save_and_load(tiny, tmp_path):
    model = tiny.panacea("llama", nonzero=True)
    # adapter names that are also module names of the model
    model.add_adapter("q_proj", PanaceaConfig(r=2, preference_dim=3, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("layers", PanaceaConfig(r=3, preference_dim=2, target_modules=["down_proj"]))
    tiny.randomize(model, seed=11, adapter_name="q_proj")
    tiny.randomize(model, seed=12, adapter_name="layers")
    preferences = {"default": [0.2, 0.8], "q_proj": [0.1, 0.3, 0.6], "layers": [1.0, 0.0]}
    input_ids = tiny.inputs(batch=2)

    expected = {}
    for name, preference in preferences.items():
        model.set_adapter(name)
        model.set_preference(preference)
        expected[name] = tiny.logits(model, input_ids)
    model.save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == ADAPTER_FILES | {"q_proj", "layers"}

    loaded = PeftModel.from_pretrained(tiny.base("llama"), tmp_path)
    for name in ("q_proj", "layers"):
        load_result = loaded.load_adapter(tmp_path / name, adapter_name=name)
        # PEFT lists as missing every key that contains the adapter's name, here the other adapters' too
        assert not [key for key in load_result.missing_keys if key.endswith(f".{name}")]
        assert load_result.unexpected_keys == []
    for name, preference in preferences.items():
        loaded.set_adapter(name)
        loaded.set_preference(preference)
        assert torch.equal(tiny.logits(loaded, input_ids), expected[name]), name

    loaded.delete_adapter("q_proj")
    loaded.set_adapter("layers")
    assert torch.equal(tiny.logits(loaded, input_ids), expected["layers"])
    loaded.save_pretrained(tmp_path / "after_delete")
    assert {path.name for path in (tmp_path / "after_delete").iterdir()} == ADAPTER_FILES | {"layers"}


def test_loading_with_a_different_preference_dim_raises(saved):
    case = saved["llama"]
    adapter_dir = case["root"] / "adapter"
    config = PanaceaConfig(r=4, preference_dim=3, target_modules="all-linear", task_type="CAUSAL_LM")

    with pytest.raises(
        ValueError, match=r"saved adapter has `preference_dim=2`.*config in use has `preference_dim=3`"
    ):
        PeftModel.from_pretrained(load_base(case), adapter_dir, config=config)

    model = PeftModel.from_pretrained(load_base(case), adapter_dir)
    model.add_adapter("three", config)
    with pytest.raises(ValueError, match=r"`preference_dim=2`.*`preference_dim=3`"):
        model.load_adapter(adapter_dir, adapter_name="three")

    config = PanaceaConfig(r=3, preference_dim=3, target_modules="all-linear", task_type="CAUSAL_LM")
    expected = (
        r"saved adapter has `preference_dim=2` and `r=4`, but the config in use has `preference_dim=3` and `r=3`"
    )
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(load_base(case), adapter_dir, config=config)


# --- fresh processes -------------------------------------------------------------------------------------------------

RELOAD_SCRIPT = """
    import json, sys, warnings

    import torch
    import peft_panacea  # registers the PANACEA tuner type
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = {}
    for root in sys.argv[1:]:
        expected = torch.load(f"{root}/expected.pt")
        base = AutoModelForCausalLM.from_pretrained(f"{root}/base").eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, f"{root}/adapter")
        with torch.no_grad():
            model.set_preference({"helpful": 0.3, "harmless": 0.7})
            logits = model(input_ids=expected["input_ids"]).logits
            model.set_preference(expected["rows"])
            row_logits = model(input_ids=expected["input_ids"]).logits
        report[root] = {
            "logits_equal": torch.equal(logits, expected["logits"]),
            "row_logits_equal": torch.equal(row_logits, expected["row_logits"]),
            "key_warnings": [str(w.message) for w in caught if "keys" in str(w.message)],
        }
    print(json.dumps(report))
"""


def test_from_pretrained_in_a_fresh_process_reproduces_the_logits(saved, run_python):
    roots = [str(saved[model_name]["root"]) for model_name in MODELS]

    report = json.loads(run_python(RELOAD_SCRIPT, *roots).splitlines()[-1])

    for root in roots:
        assert report[root] == {"logits_equal": True, "row_logits_equal": True, "key_warnings": []}, root


STOCK_LORA_SCRIPT = """
    import json, sys

    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    report = {}
    for root in sys.argv[1:]:
        base = AutoModelForCausalLM.from_pretrained(f"{root}/base").eval()
        model = PeftModel.from_pretrained(base, f"{root}/lora")
        expected = torch.load(f"{root}/expected.pt")
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        torch.save(logits, f"{root}/lora_logits.pt")
        report[root] = {"is_lora": type(model.peft_config["default"]) is LoraConfig}
    report["panacea_imported"] = any(name.startswith("peft_panacea") for name in sys.modules)
    print(json.dumps(report))
"""


def test_to_lora_loads_in_stock_peft_without_this_package(saved, run_python):
    roots = []
    for model_name in MODELS:
        case = saved[model_name]
        model = case["model"]
        model.set_preference([0.5, 0.5])
        lora_config = model.to_lora(case["root"] / "lora", preference={"helpful": 0.3, "harmless": 0.7})
        assert torch.equal(model.get_preference(), torch.tensor([0.5, 0.5]))  # restored after the export
        assert isinstance(lora_config, LoraConfig)
        assert (lora_config.r, lora_config.lora_alpha) == (4 + 2, 4 + 2)
        assert lora_config.fan_in_fan_out == (model_name == "gpt2")
        roots.append(str(case["root"]))

    report = json.loads(run_python(STOCK_LORA_SCRIPT, *roots).splitlines()[-1])

    assert report.pop("panacea_imported") is False
    for model_name, root in zip(MODELS, roots):
        assert report[root] == {"is_lora": True}
        lora_logits = torch.load(Path(root) / "lora_logits.pt")
        assert_close(lora_logits, saved[model_name]["logits"], atol=1e-4, rtol=0)


def test_to_lora_matches_panacea_in_process(tiny, tmp_path):
    model = tiny.panacea("gpt2", nonzero=True, preference_dim=3, per_objective_scale=True)
    input_ids = tiny.inputs(batch=2)
    model.set_preference([0.2, 0.5, 0.3])
    expected = tiny.logits(model, input_ids)

    model.to_lora(tmp_path)  # at the current preference
    lora = PeftModel.from_pretrained(tiny.base("gpt2"), tmp_path)
    assert type(lora.peft_config["default"]) is LoraConfig
    assert_close(tiny.logits(lora, input_ids), expected, atol=1e-4, rtol=0)


def test_to_lora_refuses_what_a_lora_cannot_hold(tiny, tmp_path):
    model = tiny.panacea("llama")
    model.set_preference(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="per-row preference"):
        model.to_lora(tmp_path / "rows")
    with pytest.raises(ValueError, match="sum to 1"):
        model.to_lora(tmp_path / "bad", preference=[0.5, 0.6])
    with pytest.raises(ValueError, match="Unknown adapter `other`"):
        model.to_lora(tmp_path / "other", preference=[0.5, 0.5], adapter_name="other")
    assert not (tmp_path / "rows").exists()

    model = tiny.panacea("gpt2", bias="panacea_only")
    with pytest.raises(NotImplementedError, match=r"`bias='panacea_only'`"):
        model.to_lora(tmp_path / "bias", preference=[0.5, 0.5])
    model = tiny.panacea("gpt2", modules_to_save=["ln_f"])
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        model.to_lora(tmp_path / "modules", preference=[0.5, 0.5])


# --- the Hub ---------------------------------------------------------------------------------------------------------

HUB_SCRIPT = """
    import json, sys

    import torch
    import peft_panacea  # registers the PANACEA tuner type
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, repo_id = sys.argv[1:]
    pushed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), f"{root}/adapter")
    commit = pushed.push_to_hub(repo_id)

    base = AutoModelForCausalLM.from_pretrained(f"{root}/base").eval()
    model = PeftModel.from_pretrained(base, repo_id)
    expected = torch.load(f"{root}/expected.pt")
    with torch.no_grad():
        model.set_preference([0.3, 0.7])
        logits = model(input_ids=expected["input_ids"]).logits
    print(json.dumps({"commit": commit.oid, "logits_equal": torch.equal(logits, expected["logits"])}))
"""


def test_push_to_hub_and_from_pretrained_through_a_local_hub(saved, run_python, tmp_path):
    root = saved["llama"]["root"]
    repo_id = "tester/panacea-tiny"
    env = {"HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}

    with HubServer() as hub:
        env["HF_ENDPOINT"] = hub.endpoint
        output = run_python(HUB_SCRIPT, str(root), repo_id, env=env, unset=HUB_ENV_TO_UNSET)
        report = json.loads(output.splitlines()[-1])
        files = hub.files(repo_id)

    assert report["logits_equal"] is True
    assert len(report["commit"]) == 40
    assert set(files) == ADAPTER_FILES
    assert files["adapter_model.safetensors"] == (root / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads(files["adapter_config.json"])["peft_type"] == "PANACEA"
    assert not hub.unhandled, hub.unhandled
    assert f"POST /api/models/{repo_id}/commit/main" in hub.requests
    assert f"GET /{repo_id}/resolve/main/adapter_model.safetensors" in hub.requests
    assert os.listdir(tmp_path / "hf_home" / "hub")  # downloaded into the test's own cache
