"""The on-node run supervisor, run for real as a process: log, metrics and status files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.jobs import MetricPatterns
from cluster.remote import supervisor

SUPERVISOR = Path(supervisor.__file__)


def test_parse_metrics_with_default_patterns():
    patterns = {k: re.compile(v) for k, v in MetricPatterns().model_dump().items()}
    assert supervisor.parse_metrics("step 40/300 loss 0.812 samples/s 1234.5\n", patterns) == {
        "step": 40,
        "loss": 0.812,
        "throughput": 1234.5,
    }
    assert supervisor.parse_metrics("final loss 0.1\n", patterns) is None


def run_supervised(tmp_path, script: str):
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", script],
                "workdir": str(tmp_path),
                "metrics": MetricPatterns().model_dump(),
            }
        )
    )
    code = subprocess.run([sys.executable, str(SUPERVISOR), str(tmp_path)], timeout=60).returncode
    return code, json.loads((tmp_path / "status.json").read_text())


def test_successful_run(tmp_path):
    code, status = run_supervised(tmp_path, "for i in range(1, 4): print(f'step {i} loss {1/i:.3f} samples/s 10')")
    assert code == 0 and status["state"] == "succeeded" and status["exit_code"] == 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["loss"] == pytest.approx(0.333)
    assert "step 3 loss" in (tmp_path / "train.log").read_text()


def test_failed_run_keeps_its_output(tmp_path):
    code, status = run_supervised(tmp_path, "import sys; print('boom'); sys.exit(3)")
    assert code == 1 and status["state"] == "failed" and status["exit_code"] == 3
    assert "boom" in (tmp_path / "train.log").read_text()
