"""fab plot: curves from a run's metrics.jsonl."""

import json

import pytest

from cluster.plot import plot_run, read_metrics
from infra.errors import TrainrigError


def test_writes_a_png_of_the_curves(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "throughput": 1000.0 + s}) for s in range(1, 50)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = plot_run(tmp_path, "t")
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_missing_metrics_says_fetch_first(tmp_path):
    with pytest.raises(TrainrigError, match="does not exist; bring the run home first with: fab fetch"):
        plot_run(tmp_path, "t")


def test_metrics_without_values(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(TrainrigError, match="holds no loss or throughput yet"):
        plot_run(tmp_path, "t")


def test_cut_short_and_non_numeric_lines_are_skipped(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 20)]
    lines[5] = '{"step": 6, "loss": "nan-ish"}'
    lines[9] = "not json at all"
    lines.append('{"step": 20, "lo')  # the copy caught the job mid-write
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert plot_run(tmp_path, "t").is_file()
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [s for s in range(1, 20) if s != 10]
