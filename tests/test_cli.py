"""The `panacea` command end to end on a tiny model and a few rows of the embedded sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama, tiny_tokenizer

from peft_panacea.cli import _parse_preference, main
from peft_panacea.pareto import read_front
from peft_panacea.trainers import MultiObjectiveDPOTrainer

TINY_BUDGET = ["--steps", "2", "--pairs-per-objective", "1", "--eval-pairs", "3", "--save-steps", "1"]
TINY_SEQUENCES = ["--max-prompt-length", "24", "--max-completion-length", "16", "--top-layers", "2"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(num_layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    main(
        [
            "demo",
            "--model",
            str(tiny_model_dir),
            "--output-dir",
            str(out),
            "--no-progress",
            *TINY_BUDGET,
            *TINY_SEQUENCES,
        ]
    )
    return out


def test_demo_writes_every_artefact(demo_dir: Path) -> None:
    for method in ("panacea", "soups"):
        folder = demo_dir / method
        for name in ("run.json", "front.json", "metrics.json", "front.png"):
            assert (folder / name).is_file(), f"{method}/{name} missing"
        front = read_front(folder / "front.json")
        assert front.objectives == ["helpful", "harmless"]
        assert len(front.points) == 11  # the whole 0.1 grid
        assert front.evaluation["rows"] == {"helpful": 3, "harmless": 3}
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["hypervolume"]["value"] >= 0
        assert set(metrics) >= {"inner_product", "sparsity", "spacing", "knee_point"}
        steering = metrics["steering"]["objectives"]
        assert set(steering) == {"helpful", "harmless"}
        assert all(entry["num_pairs"] == 3 and entry["slope_stderr"] >= 0 for entry in steering.values())
        assert front.evaluation["steering"] == steering
    assert (demo_dir / "panacea" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (demo_dir / "soups" / "adapters").iterdir()) == ["harmless", "helpful"]
    report = (demo_dir / "report.md").read_text()
    assert "Rewarded Soups" in report and "hypervolume" in report and "front.png" in report
    assert (demo_dir / "front.png").stat().st_size > 1000


def test_demo_fronts_share_one_reference_point(demo_dir: Path) -> None:
    references = [
        json.loads((demo_dir / method / "metrics.json").read_text())["hypervolume"]["reference_point"]
        for method in ("panacea", "soups")
    ]
    assert references[0] == references[1]


def test_panacea_front_moves_with_preference(demo_dir: Path) -> None:
    """After training, the adapter is no longer the identity: the scores differ between the two corners."""
    front = read_front(demo_dir / "panacea" / "front.json")
    first, last = front.points[0], front.points[-1]
    assert first.preference == {"helpful": 1.0, "harmless": 0.0}
    assert last.preference == {"helpful": 0.0, "harmless": 1.0}
    assert first.scores != last.scores


def test_front_rescores_a_run(demo_dir: Path) -> None:
    main(["front", str(demo_dir / "panacea"), "--grid-step", "0.5", "--no-progress", "--generate-prompts", "2"])
    front = read_front(demo_dir / "panacea" / "front.json")
    assert [p.preference["helpful"] for p in front.points] == [1.0, 0.5, 0.0]
    lengths = [p.extra["generation"]["mean_reply_tokens"] for p in front.points]
    assert all(0 <= length <= 64 for length in lengths)
    assert front.evaluation["generated_prompts"] == 2
    assert json.loads((demo_dir / "panacea" / "run.json").read_text())["settings"]["grid_step"] is None


def test_model_card_names_objectives_and_front(demo_dir: Path) -> None:
    card = (demo_dir / "panacea" / "adapter" / "README.md").read_text()
    assert "Objectives, in preference order: helpful, harmless" in card
    assert "implicit_reward_margin" in card


def test_chat_answers_side_by_side(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "chat",
            str(demo_dir / "panacea"),
            "--preference",
            "helpful=0.8,harmless=0.2",
            "--preference=helpful=0,harmless=1",
            "--max-new-tokens",
            "4",
            "Hello?",
        ]
    )
    out = capsys.readouterr().out
    assert "[helpful=0.8,harmless=0.2]" in out and "[helpful=0,harmless=1]" in out


def test_chat_on_soups_run(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["chat", str(demo_dir / "soups"), "--preference", "helpful=0.5,harmless=0.5", "--max-new-tokens", "3", "Hi"])
    assert "[helpful=0.5,harmless=0.5]" in capsys.readouterr().out


def test_dpo_resumes_from_its_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted during step 3 of 3 (after its second checkpoint) and restarted with the same command, a run ends
    where an uninterrupted run ends."""
    common = [
        "dpo",
        "--model",
        str(tiny_model_dir),
        *TINY_SEQUENCES,
        "--pairs-per-objective",
        "1",
        "--save-steps",
        "1",
    ]
    step = MultiObjectiveDPOTrainer.training_step

    def interrupted_step(trainer, *args, **kwargs):
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt
        return step(trainer, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MultiObjectiveDPOTrainer, "training_step", interrupted_step)
        with pytest.raises(KeyboardInterrupt):
            main([*common, "--output-dir", str(tmp_path / "a"), "--steps", "3"])
    assert not (tmp_path / "a" / "adapter").exists()
    capsys.readouterr()
    main([*common, "--output-dir", str(tmp_path / "a"), "--steps", "3"])
    restart_output = capsys.readouterr().out
    main([*common, "--output-dir", str(tmp_path / "b"), "--steps", "3"])

    assert restart_output.count("'loss/helpful'") == 1, "the restart must train step 3 only"
    resumed = json.loads((tmp_path / "a" / "run.json").read_text())["log_history"]
    straight = json.loads((tmp_path / "b" / "run.json").read_text())["log_history"]
    trained = [(entry["step"], entry["preference/helpful"]) for entry in resumed if "loss" in entry]
    expected = [(entry["step"], entry["preference/helpful"]) for entry in straight if "loss" in entry]
    assert trained == expected and [step for step, _ in trained] == [1, 2, 3]
    adapter_a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key])


def test_a_run_folder_holds_one_run(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished run is not trained again; other settings or another method in its folder are refused."""
    run = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), *TINY_SEQUENCES, "--steps", "1", "--pairs-per-objective", "1"]
    main(["dpo", *common, "--output-dir", str(run)])
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    record = (run / "run.json").read_text()

    with pytest.warns(UserWarning, match="finished panacea run with these settings; it is not trained again"):
        main(["dpo", *common, "--output-dir", str(run)])
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (run / "run.json").read_text() == record

    capsys.readouterr()
    output = ["--output-dir", str(run)]
    for arguments, message in (
        (
            ["dpo", *common, *output, "--learning-rate", "0.01"],
            "a run with other settings (learning_rate: 0.002 there, 0.01 now)",
        ),
        (["soups", *common, *output, "--no-progress"], "already holds a panacea run"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert (run / "run.json").read_text() == record


def test_yaml_config_is_accepted(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nsteps: 1\npairs_per_objective: 1\ntop_layers: 1\n"
        "max_prompt_length: 16\nmax_completion_length: 8\n"
    )
    main(["dpo", "--config", str(config), "--output-dir", str(tmp_path / "run")])
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["steps"] == 1 and settings["top_layers"] == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["nonsense"], "unknown subcommand 'nonsense'"),
        (["dpo", "--objectives", "helpful,funny", "--output-dir", "x"], "objectives"),
        (["dpo", "--objectives", "helpful", "--output-dir", "x"], "at least two distinct names"),
        (["front", "/nonexistent/run"], "not a run folder"),
        (["dpo", "--steps", "0"], "`steps` must be at least 1"),
        (["dpo", "--data-dir", "a", "--dataset", "b"], "not both"),
        (["demo", "--grid-step", "0.3"], "must divide 1 into a whole number"),
    ],
)
def test_bad_input_is_a_clear_error(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_malformed_yaml_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("steps: [1, 2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--config", str(config), "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "the --config file is not valid YAML" in error and "bad.yaml" in error


def test_parse_preference() -> None:
    assert _parse_preference("helpful=0.8,harmless=0.2", ["helpful", "harmless"]) == {"helpful": 0.8, "harmless": 0.2}
    with pytest.raises(ValueError, match="must look like helpful=0.5,harmless=0.5"):
        _parse_preference("helpful:0.8", ["helpful", "harmless"])
    with pytest.raises(ValueError, match="names 'helpful' twice"):
        _parse_preference("helpful=0.5,helpful=0.5", ["helpful", "harmless"])


def test_front_on_a_demo_folder_names_its_runs(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["front", str(demo_dir)])
    error = capsys.readouterr().err
    assert "not a run folder" in error and str(demo_dir / "panacea") in error and str(demo_dir / "soups") in error


def test_help_lists_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peft_panacea.cli", "dpo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for option in ("--pairs_per_objective", "--lora_alpha", "--top_layers", "--aggregation", "--config"):
        assert option in result.stdout


def test_three_objectives_with_rule_labelled_conciseness(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "three"
    main(
        [
            "dpo",
            "--model",
            str(tiny_model_dir),
            "--output-dir",
            str(run),
            "--objectives",
            "helpful,harmless,concise",
            "--steps",
            "1",
            "--pairs-per-objective",
            "1",
            "--eval-pairs",
            "2",
            *TINY_SEQUENCES,
        ]
    )
    main(["front", str(run), "--no-progress"])
    front = read_front(run / "front.json")
    assert front.objectives == ["helpful", "harmless", "concise"]
    assert len(front.points) == 21  # step 0.2 on the 3-objective simplex
    assert (run / "front.png").stat().st_size > 1000
