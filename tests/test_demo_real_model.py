"""`panacea demo --quick` on the real SmolLM2-135M-Instruct model and the embedded HH-RLHF sample (minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_panacea.pareto import read_front

DEMO_TIMEOUT_S = 1800


@pytest.mark.slow
def test_quick_demo_on_smollm2(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "peft_panacea.cli", "demo", "--quick", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    for method in ("panacea", "soups"):
        front = read_front(tmp_path / method / "front.json")
        assert len(front.points) == 11
        assert front.evaluation["data"].startswith("the HH-RLHF sample embedded")
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert metrics["num_points"] == 11
    settings = json.loads((tmp_path / "panacea" / "run.json").read_text())["settings"]
    assert settings["model"] == "smollm2-135m"
    report = (tmp_path / "report.md").read_text()
    assert "Panacea" in report and "Rewarded Soups" in report
