"""The multi-objective DPO trainer on a tiny Llama: training, the reference, both data layouts, losses, aggregation,
λ sampling, resuming, several processes and gradient checkpointing.

At step 0 the policy equals its reference, so every DPO logit is 0: the sigmoid loss is `ln 2`, the IPO loss
`(1 / (2 beta))^2`, the hinge loss 1, and every reward is 0. Several tests build on these values.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama, tiny_tokenizer
from transformers import TrainerCallback

import peft_panacea  # noqa: F401  (registers the PANACEA tuner type)
from peft_panacea import PanaceaConfig, PanaceaLayer
from peft_panacea.preference import PreferenceSampler, simplex_grid
from peft_panacea.trainers import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer
from peft_panacea.trainers.dpo import SIGNS_COLUMN, dpo_pair_losses, to_signed_pairs

NAMES = ["helpful", "harmless"]
LN2 = math.log(2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NUM_LAYERS = 2
ADAPTER_TENSORS = ("panacea_A", "panacea_B", "panacea_sigma", "panacea_scale")
REWARD_METRICS = ("chosen", "rejected", "margin", "accuracy")
TESTS_DIR = Path(__file__).parent
SUBPROCESS_TIMEOUT_S = 300


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny matrices run fastest on one thread; two threads on shared cores spin for milliseconds per matmul."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- builders -----------------------------------------------------------------------------------------------------


@functools.cache
def tokenizer():
    """One tokenizer for the whole module: `tiny_tokenizer()` numbers the bytes differently at every call."""
    return tiny_tokenizer()


def panacea_config(**kwargs) -> PanaceaConfig:
    return PanaceaConfig(
        r=4, preference_dim=2, preference_names=NAMES, target_modules=TARGETS, task_type="CAUSAL_LM", **kwargs
    )


def dpo_args(tmp_path: Path, **kwargs) -> MultiObjectiveDPOConfig:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "objectives": NAMES,
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "logging_steps": 1,
        "learning_rate": 1e-2,
        "seed": 0,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    settings.update(kwargs)
    return MultiObjectiveDPOConfig(**settings)


def turn(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def response_pairs(
    helpful: list[int | None] | None = None,
    harmless: list[int | None] | None = None,
    conversational: bool = True,
    columns: tuple[str, str] = ("helpful_response_id", "harmless_response_id"),
) -> Dataset:
    """Layout 1: `prompt`, `response_0`, `response_1` and one label column per objective (8 rows by default)."""
    helpful = [i % 2 for i in range(8)] if helpful is None else helpful
    harmless = [(i // 2) % 2 for i in range(len(helpful))] if harmless is None else harmless
    rows = []
    for i, labels in enumerate(zip(helpful, harmless)):
        prompt, first, second = f"question {i}", f" answer {i}", f" another reply {i}"
        if conversational:
            prompt, first, second = turn("user", prompt), turn("assistant", first), turn("assistant", second)
        rows.append({"prompt": prompt, "response_0": first, "response_1": second, **dict(zip(columns, labels))})
    return Dataset.from_list(rows)


def objective_pairs(sizes: tuple[int, int] = (4, 4), conversational: bool = False) -> dict[str, Dataset]:
    """Layout 2: one `prompt`, `chosen`, `rejected` dataset per objective."""
    datasets = {}
    for name, size in zip(NAMES, sizes):
        rows = []
        for i in range(size):
            prompt, chosen, rejected = f"{name} question {i}", f" good {i}", f" bad answer {i}"
            if conversational:
                prompt, chosen, rejected = turn("user", prompt), turn("assistant", chosen), turn("assistant", rejected)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        datasets[name] = Dataset.from_list(rows)
    return datasets


def make_trainer(tmp_path: Path, model=None, train_dataset=None, **kwargs) -> MultiObjectiveDPOTrainer:
    """A trainer on the tiny Llama: a new adapter from `panacea_config()`, unless `model` is already wrapped."""
    model = tiny_llama() if model is None else model
    return MultiObjectiveDPOTrainer(
        model,
        args=dpo_args(tmp_path, **kwargs),
        train_dataset=response_pairs() if train_dataset is None else train_dataset,
        processing_class=tokenizer(),
        peft_config=None if isinstance(model, PeftModel) else panacea_config(),
    )


def pretrained_adapter(tiny, preference: list[float] | None = None) -> PeftModel:
    """A wrapped adapter with non-zero weights everywhere: it is not the identity, at any preference."""
    model = get_peft_model(tiny_llama(), panacea_config())
    tiny.randomize(model)
    if preference is not None:
        model.set_preference(preference)
    return model


def adapter_tensors(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Every Panacea tensor of `adapter`, the preference included, keyed by module and attribute."""
    tensors = {}
    for module_name, layer in model.named_modules():
        if isinstance(layer, PanaceaLayer) and adapter in layer.panacea_A:
            for attribute in (*ADAPTER_TENSORS, "panacea_preference"):
                tensors[f"{module_name}.{attribute}"] = getattr(layer, attribute)[adapter].detach().clone()
    return tensors


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def step_logs(trainer: MultiObjectiveDPOTrainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def collate(trainer: MultiObjectiveDPOTrainer, rows: range | list[int]) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def assert_gradients_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding of sums taken in another order: 1e-4 of the tensor's largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), msg=name)


def fix_preference(monkeypatch, trainer: MultiObjectiveDPOTrainer, preference: list[float]) -> None:
    monkeypatch.setattr(trainer.preference_sampler, "sample", lambda step, rows=None: torch.tensor(preference))


# --- training -----------------------------------------------------------------------------------------------------


def test_training_changes_every_adapter_tensor_and_logs_every_objective(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    before = trainable(trainer.model)
    kinds = {name.rsplit(".", 2)[-2] for name in before}
    assert kinds == set(ADAPTER_TENSORS)
    assert len(before) == NUM_LAYERS * len(TARGETS) * len(ADAPTER_TENSORS)

    trainer.train()

    after = trainable(trainer.model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
    logs = step_logs(trainer)
    assert len(logs) == 3
    for step, log in enumerate(logs):
        for name in NAMES:
            keys = [f"loss/{name}", *(f"rewards/{name}/{metric}" for metric in REWARD_METRICS)]
            assert all(math.isfinite(log[key]) for key in keys), log
            assert 0.0 <= log[f"rewards/{name}/accuracy"] <= 1.0
        # One λ per step, a pure function of the seed and the step.
        expected = trainer.preference_sampler.sample(step)
        assert [log[f"preference/{name}"] for name in NAMES] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize("start", ["peft_config", "wrapped", "pretrained"])
def test_reference_is_the_starting_policy(tmp_path, tiny, start):
    """Rewards are 0 and every loss is ln 2 at step 0, whether TRL wraps the model or is given a wrapped one."""
    if start == "peft_config":
        model = tiny_llama()
    elif start == "wrapped":
        model = get_peft_model(tiny_llama(), panacea_config())
    else:
        model = pretrained_adapter(tiny, preference=[0.9, 0.1])
        ids = torch.tensor([[40, 41, 42, 43, 44]])
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        with torch.no_grad():
            assert (model(input_ids=ids).logits - base_logits).abs().max() > 1e-2

    trainer = make_trainer(tmp_path, model=model)

    if start == "peft_config":
        assert "ref" not in trainer.model.peft_config
    else:
        policy, reference = adapter_tensors(trainer.model), adapter_tensors(trainer.model, "ref")
        assert len(policy) == NUM_LAYERS * len(TARGETS) * (len(ADAPTER_TENSORS) + 1)
        assert reference.keys() == policy.keys()
        for key in policy:
            torch.testing.assert_close(reference[key], policy[key], rtol=0, atol=0, msg=key)
        if start == "pretrained":
            assert trainer.model.get_preference("ref").tolist() == pytest.approx([0.9, 0.1])
        assert not any(param.requires_grad for name, param in trainer.model.named_parameters() if ".ref" in name)

    trainer.train()

    first = step_logs(trainer)[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    for name in NAMES:
        assert first[f"loss/{name}"] == pytest.approx(LN2, abs=1e-6)
        for reward in ("chosen", "rejected", "margin"):
            assert first[f"rewards/{name}/{reward}"] == pytest.approx(0.0, abs=1e-6)
    if start != "peft_config":
        # The reference stays where it started while the policy moves.
        after = adapter_tensors(trainer.model, "ref")
        for key in (key for key in reference if not key.endswith("panacea_preference")):
            torch.testing.assert_close(after[key], reference[key], rtol=0, atol=0)


def test_adapter_loaded_for_inference_is_refused(tmp_path):
    get_peft_model(tiny_llama(), panacea_config()).save_pretrained(tmp_path / "adapter")

    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=False)
    with pytest.raises(ValueError, match=r"no trainable parameters.*is_trainable=True"):
        make_trainer(tmp_path, model=frozen)

    trainable_adapter = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    trainer = make_trainer(tmp_path, model=trainable_adapter)
    assert len(trainable(trainer.model)) == NUM_LAYERS * len(TARGETS) * len(ADAPTER_TENSORS)


def test_precomputed_reference_only_for_a_new_adapter(tmp_path, tiny):
    """A given adapter's reference depends on λ, so it cannot be precomputed; the base model's can."""
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        make_trainer(tmp_path, model=pretrained_adapter(tiny), precompute_ref_log_probs=True)

    trainer = make_trainer(tmp_path, precompute_ref_log_probs=True)
    trainer.train()
    first = step_logs(trainer)[0]
    for name in NAMES:
        assert first[f"loss/{name}"] == pytest.approx(LN2, abs=1e-6)
        assert first[f"rewards/{name}/margin"] == pytest.approx(0.0, abs=1e-6)


# --- data layouts -------------------------------------------------------------------------------------------------


def test_layout1_labels_become_signs(tmp_path):
    """Label 0 (the first response is preferred) gives +1, 1 gives -1, None gives 0; unlabelled rows are dropped."""
    dataset = response_pairs(
        helpful=[0, 1, None, None], harmless=[1, None, 0, None], columns=("better_response_id", "safer_response_id")
    )
    args = dpo_args(tmp_path, label_columns={"helpful": "better_response_id", "harmless": "safer_response_id"})

    signed, owners = to_signed_pairs(dataset, args)

    assert owners is None
    assert signed[SIGNS_COLUMN] == [[1, -1], [-1, 0], [0, 1]]
    assert signed["chosen"] == dataset["response_0"][:3]
    assert signed["rejected"] == dataset["response_1"][:3]


@pytest.mark.parametrize("conversational", [True, False])
def test_layout1_trains_with_named_label_columns(tmp_path, conversational):
    dataset = response_pairs(
        helpful=[0, 1, 1, 0, 1, 0, 0, 1],
        harmless=[1, 1, None, 0, 0, None, 1, 0],
        conversational=conversational,
        columns=("better_response_id", "safer_response_id"),
    )
    trainer = make_trainer(
        tmp_path,
        train_dataset=dataset,
        max_steps=2,
        label_columns={"helpful": "better_response_id", "harmless": "safer_response_id"},
    )
    assert len(trainer.train_dataset) == 8

    trainer.train()

    logs = step_logs(trainer)
    assert len(logs) == 2
    for name in NAMES:
        assert logs[0][f"loss/{name}"] == pytest.approx(LN2, abs=1e-6)
        assert all(math.isfinite(log[f"rewards/{name}/margin"]) for log in logs)


def test_missing_labels_give_no_loss(tmp_path):
    """Without any harmless label, the loss is `lambda_helpful * ln 2` (weights are not renormalised)."""
    dataset = response_pairs(helpful=[0, 1, 1, 0], harmless=[None] * 4)
    trainer = make_trainer(tmp_path, train_dataset=dataset)

    trainer.train()

    log = step_logs(trainer)[0]
    assert log["loss/helpful"] == pytest.approx(LN2, abs=1e-6)
    assert not [key for key in log if key.startswith(("loss/harmless", "rewards/harmless"))]
    assert log["preference/helpful"] + log["preference/harmless"] == pytest.approx(1.0)
    assert log["loss"] == pytest.approx(log["preference/helpful"] * LN2, abs=1e-6)


@pytest.mark.parametrize("conversational", [True, False])
def test_layout2_every_batch_has_every_objective(tmp_path, conversational):
    trainer = make_trainer(
        tmp_path, train_dataset=objective_pairs(sizes=(6, 4), conversational=conversational), max_steps=2
    )

    batches = [batch[SIGNS_COLUMN].tolist() for batch in trainer.get_train_dataloader()]
    # 2 rows per objective and batch, until the smaller objective (4 rows) runs out.
    assert len(batches) == 2
    for signs in batches:
        assert sorted(signs) == [[0, 1], [0, 1], [1, 0], [1, 0]]

    trainer.train()

    for log in step_logs(trainer):
        assert {f"loss/{name}" for name in NAMES} <= log.keys()
    first = step_logs(trainer)[0]
    assert [first["loss/helpful"], first["loss/harmless"], first["loss"]] == pytest.approx([LN2] * 3, abs=1e-6)


BAD_DATA = {
    "layout 1 without response_1": (
        lambda: response_pairs().remove_columns("response_1"),
        ValueError,
        r"needs the column\(s\) \['response_1'\]",
    ),
    "layout 1 without a label column": (
        lambda: response_pairs().remove_columns("harmless_response_id"),
        ValueError,
        r"Objective 'harmless' needs the column\(s\) \['harmless_response_id'\]",
    ),
    "layout 1 with label 2": (
        lambda: response_pairs(helpful=[0, 2, 1, 0]),
        ValueError,
        r"must hold 0, 1 or None.*has 2",
    ),
    "layout 2 without rejected": (
        lambda: {**objective_pairs(), "harmless": objective_pairs()["harmless"].remove_columns("rejected")},
        ValueError,
        r"Objective 'harmless' needs the column\(s\) \['rejected'\]",
    ),
    "layout 2 without an objective": (
        lambda: {"helpful": objective_pairs()["helpful"]},
        ValueError,
        r"lacks \['harmless'\]",
    ),
    "layout 2 with an unknown objective": (
        lambda: {**objective_pairs(), "honest": objective_pairs()["helpful"]},
        ValueError,
        r"unknown keys \['honest'\]",
    ),
    "a list of rows": (lambda: response_pairs().to_list(), TypeError, r"must be a `datasets.Dataset`"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused(tmp_path, case):
    make_dataset, error, message = BAD_DATA[case]
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, train_dataset=make_dataset())


def test_layout2_batch_size_must_be_a_multiple_of_the_objectives(tmp_path):
    trainer = make_trainer(tmp_path, train_dataset=objective_pairs(), per_device_train_batch_size=3)
    with pytest.raises(ValueError, match=r"multiple of the number of objectives \(2\).*got 3"):
        trainer.train()


def test_objectives_must_match_the_adapter(tmp_path):
    swapped = ["harmless", "helpful"]
    with pytest.raises(ValueError, match=r"must equal the adapter's `preference_names`"):
        make_trainer(tmp_path, objectives=swapped)
    with pytest.raises(ValueError, match=r"must equal the adapter's `preference_names`"):
        make_trainer(tmp_path, model=get_peft_model(tiny_llama(), panacea_config()), objectives=swapped)

    unnamed = PanaceaConfig(r=4, preference_dim=3, target_modules=TARGETS, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"`preference_dim=3`, but 2 objectives"):
        MultiObjectiveDPOTrainer(
            get_peft_model(tiny_llama(), unnamed),
            args=dpo_args(tmp_path),
            train_dataset=response_pairs(),
            processing_class=tokenizer(),
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"objectives": []}, "at least one objective"),
        ({"objectives": ["helpful", "helpful"]}, "unique names"),
        ({"aggregation": "max"}, "`aggregation` must be one of"),
        ({"loss_type": "robust"}, "`loss_type` must be one of"),
        ({"ideal_point": [0.0]}, "one value per objective"),
        ({"label_columns": {"honest": "honest_id"}}, r"unknown objectives \['honest'\]"),
        ({"preference_sampling": "sobol"}, "`preference_sampling` must be one of"),
        ({"ld_alpha": 0.5}, r"\['ld_alpha'\] are not supported"),
        ({"f_divergence_type": "js_divergence"}, r"\['f_divergence_type'\] are not supported"),
    ],
)
def test_bad_config_is_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        dpo_args(tmp_path, **settings)


# --- truncation ---------------------------------------------------------------------------------------------------


def test_fully_truncated_row_gets_zero_weight(tmp_path, tiny, monkeypatch):
    """A pair whose completion is cut away entirely by `max_length` changes neither the loss nor the metrics."""
    trainer = make_trainer(tmp_path, train_dataset=response_pairs(conversational=False), max_length=24, beta=2.0)
    tiny.randomize(trainer.model, adapter_name="default")  # the policy leaves the reference: rewards are not 0
    trainer.model.train()
    fix_preference(monkeypatch, trainer, [0.6, 0.4])
    rows = [trainer.train_dataset[i] for i in range(3)]
    too_long = {**trainer.train_dataset[3], "prompt_ids": list(range(40, 70))}  # 30 prompt tokens > max_length

    batch = trainer.data_collator([*rows, too_long])
    assert batch["completion_mask"][[3, 7]].sum() == 0
    loss_with = trainer.compute_loss(trainer.model, batch)
    metrics_with = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    loss_without = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    metrics_without = {key: values[-1] for key, values in trainer._metrics["train"].items()}

    assert torch.isfinite(loss_with)
    assert loss_with.item() == pytest.approx(loss_without.item(), rel=1e-5)
    assert metrics_with == pytest.approx(metrics_without, rel=1e-5, abs=1e-6)
    # Counted, the cut pair (logit 0, loss ln 2) would have pulled an objective's mean loss towards ln 2.
    assert max(abs(metrics_without[f"loss/{name}"] - LN2) for name in NAMES) > 1e-2


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_tiny_max_length_stays_finite(tmp_path, truncation_mode):
    """Layout 2 with long prompts for one objective: TRL drops them under `keep_start`, batches stay balanced."""
    datasets = objective_pairs(sizes=(6, 4))
    long_prompts = [("x" * 40 if i < 2 else prompt) for i, prompt in enumerate(datasets["helpful"]["prompt"])]
    datasets["helpful"] = datasets["helpful"].remove_columns("prompt").add_column("prompt", long_prompts)
    trainer = make_trainer(
        tmp_path, train_dataset=datasets, max_length=24, truncation_mode=truncation_mode, max_steps=2
    )
    assert len(trainer.train_dataset) == (8 if truncation_mode == "keep_start" else 10)

    for batch in trainer.get_train_dataloader():
        assert sorted(batch[SIGNS_COLUMN].tolist()) == [[0, 1], [0, 1], [1, 0], [1, 0]]
    trainer.train()

    for log in step_logs(trainer):
        assert all(math.isfinite(value) for value in log.values())
        assert {f"loss/{name}" for name in NAMES} <= log.keys()


# --- losses and aggregation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "expected"), [("sigmoid", LN2), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)])
def test_first_step_loss_per_loss_type(tmp_path, loss_type, expected):
    """At logit 0 with beta = 0.1: sigmoid ln 2, IPO (1 / 0.2)^2 = 25, hinge relu(1 - 0) = 1."""
    trainer = make_trainer(tmp_path, loss_type=loss_type, beta=0.1)

    trainer.train()

    first = step_logs(trainer)[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    for name in NAMES:
        assert first[f"loss/{name}"] == pytest.approx(expected, rel=1e-6)


def test_dpo_pair_losses_by_hand():
    """beta = 0.5 and logits x = (0, 2, -1), so beta x = (0, 1, -0.5).

    sigmoid, -log sigmoid(z) = log(1 + e^-z): log 2 = 0.693147, log(1 + e^-1) = 0.313262, log(1 + e^0.5) = 0.974077.
    With label smoothing 0.1, 0.9 of that plus 0.1 log(1 + e^z): 0.693147, 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    and 0.9 * 0.974077 + 0.1 * 0.474077 = 0.924077.
    ipo, (x - 1 / (2 beta))^2 = (x - 1)^2: 1, 1, 4.
    hinge, relu(1 - beta x): 1, 0, 1.5.
    """
    logits = torch.tensor([0.0, 2.0, -1.0])
    expected = {
        ("sigmoid", 0.0): [0.693147, 0.313262, 0.974077],
        ("sigmoid", 0.1): [0.693147, 0.413262, 0.924077],
        ("ipo", 0.0): [1.0, 1.0, 4.0],
        ("hinge", 0.0): [1.0, 0.0, 1.5],
    }
    for (loss_type, smoothing), values in expected.items():
        losses = dpo_pair_losses(logits, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
        torch.testing.assert_close(losses, torch.tensor(values), atol=1e-6, rtol=0)

    per_objective = dpo_pair_losses(torch.zeros(3, 2), beta=0.5, loss_type="sigmoid")  # (batch, m) kept
    torch.testing.assert_close(per_objective, torch.full((3, 2), LN2))
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        dpo_pair_losses(logits, beta=0.5, loss_type="robust")


def test_linear_scalarization_and_tchebycheff_gradients(tmp_path, tiny, monkeypatch):
    """At step 0 both objectives have loss ln 2. Call G_h and G_s the gradients of each objective's loss alone.

    LS: L = 0.7 L_h + 0.3 L_s, gradient 0.7 G_h + 0.3 G_s, the sum of the gradients with one objective masked out.
    Tche: L = max(0.7 L_h, 0.3 L_s) = 0.7 L_h, gradient 0.7 G_h: the harmless objective contributes nothing.
    With λ = (0.2, 0.8) the maximum is the harmless term, and Tche's gradient is 0.8 G_s.
    """
    trainer = make_trainer(tmp_path, model=pretrained_adapter(tiny))  # every tensor gets a gradient at step 0
    trainer.model.train()
    batch = collate(trainer, range(4))
    assert (batch[SIGNS_COLUMN] != 0).all()

    def gradients(aggregation: str, present: list[float]) -> tuple[float, dict[str, torch.Tensor]]:
        trainer.args.aggregation = aggregation
        trainer.model.zero_grad()
        signs = batch[SIGNS_COLUMN] * torch.tensor(present)  # (batch, m), masked objectives have no loss
        loss = trainer.compute_loss(trainer.model, {**batch, SIGNS_COLUMN: signs})
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}

    fix_preference(monkeypatch, trainer, [0.7, 0.3])
    ls_loss, ls = gradients("ls", [1, 1])
    _, helpful_only = gradients("ls", [1, 0])
    _, harmless_only = gradients("ls", [0, 1])
    tche_loss, tche = gradients("tchebycheff", [1, 1])

    assert ls_loss == pytest.approx(LN2, abs=1e-6)
    assert tche_loss == pytest.approx(0.7 * LN2, abs=1e-6)
    assert all(grad.abs().sum() > 0 for grad in harmless_only.values())
    for name in ls:
        assert_gradients_close(ls[name], helpful_only[name] + harmless_only[name], name)
        assert_gradients_close(tche[name], helpful_only[name], name)
    assert any(not torch.allclose(tche[name], ls[name], rtol=1e-3) for name in ls)

    fix_preference(monkeypatch, trainer, [0.2, 0.8])
    _, harmless_only = gradients("ls", [0, 1])
    tche_loss, tche = gradients("tchebycheff", [1, 1])
    assert tche_loss == pytest.approx(0.8 * LN2, abs=1e-6)
    for name in tche:
        assert_gradients_close(tche[name], harmless_only[name], name)


@pytest.mark.parametrize("aggregation", ["ls", "tchebycheff"])
def test_preference_per_row(tmp_path, tiny, aggregation):
    """Each pair gets its own λ, the same for its chosen and rejected rows, in the policy and in the reference.

    At step 0 every loss is ln 2, so per row LS gives ln 2 (λ sums to 1) and Tche gives max_i(λ_i) ln 2.
    """
    trainer = make_trainer(tmp_path, model=pretrained_adapter(tiny), preference_per_row=True, aggregation=aggregation)
    trainer.model.train()

    loss = trainer.compute_loss(trainer.model, collate(trainer, range(4)))

    expected = trainer.preference_sampler.sample(0, rows=4)  # (4, 2), the first draw
    assert expected[:, 0].unique().numel() == 4
    for adapter in ("default", "ref"):
        preference = trainer.model.get_preference(adapter)
        assert preference.shape == (8, 2)
        torch.testing.assert_close(preference, torch.cat([expected, expected]))
    if aggregation == "ls":
        assert loss.item() == pytest.approx(LN2, abs=1e-6)
    else:
        assert loss.item() == pytest.approx(LN2 * expected.max(dim=1).values.mean().item(), abs=1e-6)
    metrics = trainer._metrics["train"]
    assert metrics["preference/helpful"][-1] == pytest.approx(expected[:, 0].mean().item())

    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in step_logs(trainer))
    # After training the adapter is back at the centre, ready for a batch of any size.
    torch.testing.assert_close(trainer.model.get_preference(), torch.tensor([0.5, 0.5]))


# --- λ sampling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dirichlet", "uniform", "vertex_mixture", "grid"])
def test_sampler_is_seeded_and_on_the_simplex(method):
    sampler = PreferenceSampler(3, method, concentration=0.5, vertex_probability=0.3, grid_step=0.25, seed=11)
    twin = PreferenceSampler(3, method, concentration=0.5, vertex_probability=0.3, grid_step=0.25, seed=11)
    other = PreferenceSampler(3, method, concentration=0.5, vertex_probability=0.3, grid_step=0.25, seed=12)

    draws = sampler.sample(4, rows=2000)  # (2000, 3)
    assert draws.shape == (2000, 3)
    assert (draws >= 0).all()
    torch.testing.assert_close(draws.sum(dim=1), torch.ones(2000))
    torch.testing.assert_close(twin.sample(4, rows=2000), draws, rtol=0, atol=0)
    assert not torch.equal(other.sample(4, rows=2000), draws)
    assert not torch.equal(sampler.sample(5, rows=2000), draws)
    torch.testing.assert_close(sampler.sample(4), twin.sample(4), rtol=0, atol=0)
    assert sampler.sample(4).shape == (3,)

    corners = (draws == 1.0).any(dim=1).float().mean().item()
    if method == "grid":
        grid = set(simplex_grid(3, 0.25))
        assert {tuple(row) for row in draws.tolist()} == grid  # only grid points, and all 15 of them
    elif method == "vertex_mixture":
        assert corners == pytest.approx(0.3, abs=0.03)  # 4 standard deviations of a 2000-draw frequency
    else:
        assert corners == 0.0
    if method == "uniform":
        # Dirichlet(1, 1, 1): each coordinate has mean 1/3 whatever `concentration` says.
        torch.testing.assert_close(draws.mean(dim=0), torch.full((3,), 1 / 3), atol=0.02, rtol=0)


def test_sampler_vertex_probability_extremes_and_concentration():
    never = PreferenceSampler(2, "vertex_mixture", vertex_probability=0.0).sample(0, rows=500)
    always = PreferenceSampler(2, "vertex_mixture", vertex_probability=1.0).sample(0, rows=500)
    assert not (never == 1.0).any()
    assert ((always == 1.0).sum(dim=1) == 1).all()

    spread = PreferenceSampler(2, "dirichlet", concentration=0.2).sample(0, rows=2000)
    central = PreferenceSampler(2, "dirichlet", concentration=20.0).sample(0, rows=2000)
    assert spread.max(dim=1).values.mean() > central.max(dim=1).values.mean() + 0.2


def test_sampler_leaves_the_global_random_state_alone():
    sampler = PreferenceSampler(2, "vertex_mixture", seed=3)
    torch.manual_seed(123)
    expected = torch.rand(5)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    sampler.sample(0, rows=10)
    sampler.sample(1)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


# --- resuming, several processes ----------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Stops training after step `step`, as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resuming_repeats_the_uninterrupted_run(tmp_path):
    """12 rows, 2 per micro-batch, 2 micro-batches per step: 3 steps an epoch; stop after 2, resume to 5."""
    settings = {
        "train_dataset": response_pairs(helpful=[i % 2 for i in range(12)]),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 5,
    }
    uninterrupted = make_trainer(tmp_path / "uninterrupted", **settings)
    uninterrupted.train()

    interrupted = make_trainer(tmp_path / "resumed", save_strategy="steps", save_steps=2, **settings)
    interrupted.add_callback(StopAt(2))
    interrupted.train()
    assert interrupted.state.global_step == 2
    assert (tmp_path / "resumed" / "out" / "checkpoint-2").is_dir()
    resumed = make_trainer(tmp_path / "resumed", save_strategy="steps", save_steps=2, **settings)
    resumed.train(resume_from_checkpoint=True)

    expected, actual = trainable(uninterrupted.model), trainable(resumed.model)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)

    def preferences(trainer):
        return [[log[f"preference/{name}"] for name in NAMES] for log in step_logs(trainer)]

    assert len(preferences(resumed)) == 5
    torch.testing.assert_close(torch.tensor(preferences(resumed)), torch.tensor(preferences(uninterrupted)))
    assert len({tuple(row) for row in preferences(resumed)}) == 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_same_preference_on_every_process(tmp_path):
    """Two CPU processes in data-parallel training draw the same λ at every step.

    `accelerate launch --cpu --num_processes 2` starts one process per machine and needs `mpirun` for more, so the
    two processes are started with torchrun; accelerate (ACCELERATE_USE_CPU) runs them as MULTI_CPU over gloo.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(TESTS_DIR / "accelerate_script.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        command, cwd=TESTS_DIR, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    if completed.returncode != 0:
        output = f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        pytest.fail(f"The launch failed ({completed.returncode}):\n{output}")

    records = [json.loads((tmp_path / f"process-{index}.json").read_text()) for index in range(2)]
    assert [record["num_processes"] for record in records] == [2, 2]
    preferences = records[0]["preferences"]
    assert len(preferences) == 3 and len({tuple(row) for row in preferences}) == 3
    assert records[1]["preferences"] == preferences
    expected = torch.stack([PreferenceSampler(2, seed=7).sample(step) for step in range(3)])
    torch.testing.assert_close(torch.tensor(preferences), expected)
    assert records[1]["adapter"] == records[0]["adapter"]  # the replicas stayed in sync


# --- gradient checkpointing ---------------------------------------------------------------------------------------


class GradientRecorder(TrainerCallback):
    """Keeps the gradients of the first optimizer step and whether gradient checkpointing was on."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor | None] = {}
        self.checkpointing = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients:
            self.checkpointing = model.get_base_model().is_gradient_checkpointing
            self.gradients = {
                name: None if param.grad is None else param.grad.clone()
                for name, param in model.named_parameters()
                if param.requires_grad
            }


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_reaches_every_adapter_tensor(tmp_path, tiny, use_reentrant):
    gradients = {}
    for checkpointing in (False, True):
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}} if checkpointing else {}
        trainer = make_trainer(
            tmp_path, model=pretrained_adapter(tiny), gradient_checkpointing=checkpointing, max_grad_norm=0.0, **kwargs
        )
        recorder = GradientRecorder()
        trainer.add_callback(recorder)
        trainer.train()
        assert recorder.checkpointing is checkpointing
        gradients[checkpointing] = recorder.gradients

    assert len(gradients[True]) == NUM_LAYERS * len(TARGETS) * len(ADAPTER_TENSORS)
    for name, grad in gradients[True].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_gradients_close(grad, gradients[False][name], name)


# --- shared frozen layers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["new", "pretrained"])
def test_shared_frozen_layers_match_the_full_forward(tmp_path, tiny, start):
    """With the adapter on the top layer only, sharing the lower layer between policy and reference changes nothing:
    the same step-0 loss (ln 2 for a new adapter) and the same gradients as TRL's separate full forwards."""
    results = {}
    for shared in (True, False):
        base = tiny_llama(num_layers=3)
        config = panacea_config(layers_to_transform=[2], layers_pattern="layers")
        if start == "pretrained":
            model = get_peft_model(base, config)
            tiny.randomize(model)
        else:
            model = base
        trainer = MultiObjectiveDPOTrainer(
            model,
            args=dpo_args(tmp_path, share_frozen_layers=shared, max_grad_norm=0.0),
            train_dataset=response_pairs(),
            processing_class=tokenizer(),
            peft_config=None if isinstance(model, PeftModel) else config,
        )
        assert (trainer._decoder_stack is not None) is shared
        if shared:
            assert trainer._decoder_stack.first == 2
        recorder = GradientRecorder()
        trainer.add_callback(recorder)
        trainer.train()
        results[shared] = (step_logs(trainer)[0], recorder.gradients)

    (logs_shared, grads_shared), (logs_full, grads_full) = results[True], results[False]
    assert logs_shared["loss"] == pytest.approx(logs_full["loss"], abs=1e-5)
    if start == "new":
        assert logs_shared["loss/helpful"] == pytest.approx(LN2, abs=1e-6)
    assert grads_shared.keys() == grads_full.keys() and grads_shared
    for name in grads_shared:
        assert_gradients_close(grads_shared[name], grads_full[name], name)


@pytest.mark.parametrize("start", ["new", "pretrained"])
def test_shared_layers_dpo_trainer_matches_trl_for_lora(tmp_path, start):
    """`SharedLayersDPOTrainer` (used for the Rewarded Soups adapters) with a LoRA adapter on the top layer gives TRL's
    `DPOTrainer` step: the same loss, the same logged rewards and the same gradients."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from peft_panacea.trainers import SharedLayersDPOTrainer

    lora = LoraConfig(
        r=4, target_modules=TARGETS, layers_to_transform=[2], layers_pattern="layers", task_type="CAUSAL_LM"
    )
    results = {}
    for trainer_class in (SharedLayersDPOTrainer, DPOTrainer):
        model = tiny_llama(num_layers=3)
        if start == "pretrained":
            model = get_peft_model(model, lora)
            generator = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        args = DPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            max_steps=1,
            logging_steps=1,
            learning_rate=1e-2,
            max_grad_norm=0.0,
            seed=0,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            bf16=False,
            gradient_checkpointing=False,
        )
        trainer = trainer_class(
            model,
            args=args,
            train_dataset=objective_pairs(sizes=(4, 0))["helpful"],
            processing_class=tokenizer(),
            peft_config=None if isinstance(model, PeftModel) else lora,
        )
        if trainer_class is SharedLayersDPOTrainer:
            assert trainer._shares_frozen_layers() and trainer._decoder_stack.first == 2
        recorder = GradientRecorder()
        trainer.add_callback(recorder)
        trainer.train()
        results[trainer_class] = (step_logs(trainer)[0], recorder.gradients)

    (logs_shared, grads_shared), (logs_trl, grads_trl) = results[SharedLayersDPOTrainer], results[DPOTrainer]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert logs_shared[key] == pytest.approx(logs_trl[key], rel=1e-6, abs=1e-5), key
    assert logs_shared["loss"] == pytest.approx(LN2, abs=1e-6)  # the reference is the starting policy
    assert grads_shared.keys() == grads_trl.keys() and grads_shared
    nonzero = [name for name, grad in grads_trl.items() if grad is not None and grad.abs().max() > 0]
    assert nonzero
    for name in grads_shared:
        assert_gradients_close(grads_shared[name], grads_trl[name], name)
