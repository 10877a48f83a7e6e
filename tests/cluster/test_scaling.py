"""fab scaling: throughput from a run's metrics, speed-up and efficiency against ideal, the table and the PNG."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import matplotlib.image
import pytest

from cluster import jobs, monitor, results, runs, scaling
from cluster.scaling import Point
from infra.errors import TrainrigError
from tests.helpers import make_inventory

ROOT = Path(__file__).resolve().parents[2]


def test_sizes_are_increasing_positive_counts():
    assert scaling.parse_sizes("1,2,4") == [1, 2, 4]
    assert scaling.parse_sizes("3") == [3]
    for bad in ("2,1", "1,1,2", "0,1", "1,,2", "a", ""):
        with pytest.raises(TrainrigError, match=r"^--nodes "):
            scaling.parse_sizes(bad)


def test_throughput_is_the_median_after_the_first_interval():
    metrics = [
        {"step": 10 * i, "throughput": rate, "time": float(i)} for i, rate in enumerate([5.0, 100.0, 90.0, 110.0])
    ]
    assert scaling.throughput_of(metrics) == (100.0, "samples/s")
    assert scaling.throughput_of([{"step": 1, "throughput": 7.0}]) == (7.0, "samples/s")


def test_steps_per_second_when_the_job_logs_no_throughput():
    # Start-up (step 0 -> 10 took 30 s) is left out: 40 steps in 4 s after it.
    metrics = [{"step": 10, "time": 30.0}, {"step": 20, "time": 31.0}, {"step": 60, "time": 35.0}]
    assert scaling.throughput_of(metrics) == (10.0, "steps/s")
    with pytest.raises(TrainrigError, match="logged no throughput and too few steps to time"):
        scaling.throughput_of([{"step": 1, "time": 3.0}])


def points(*rates: float) -> list[Point]:
    return [
        Point(nodes=n, ranks=2 * n, throughput=rate, unit="samples/s", run_id=f"r{n}")
        for n, rate in zip([1, 2, 4], rates, strict=False)
    ]


def test_speedup_and_efficiency_against_ideal():
    measured = scaling.rows(points(1000.0, 1800.0, 3000.0))
    assert [r.speedup for r in measured] == [1.0, 1.8, 3.0]
    assert [r.ideal for r in measured] == [1000.0, 2000.0, 4000.0]
    assert [r.efficiency for r in measured] == pytest.approx([1.0, 0.9, 0.75])


def test_table_has_one_row_per_size():
    table = scaling.table("dp-mlp", scaling.rows(points(1000.0, 1800.0, 3000.0)))
    columns = {c.header: c._cells for c in table.columns}
    assert list(columns) == ["nodes", "ranks", "samples/s", "speed-up", "ideal", "efficiency", "run"]
    assert columns["nodes"] == ["1", "2", "4"] and columns["ranks"] == ["2", "4", "8"]
    assert columns["speed-up"] == ["1.00x", "1.80x", "3.00x"] and columns["efficiency"] == ["100%", "90%", "75%"]
    assert columns["samples/s"] == ["1,000.0", "1,800.0", "3,000.0"]


def test_the_figure_has_throughput_and_efficiency_panels_each_against_ideal():
    fig = scaling.figure(scaling.rows(points(1000.0, 1800.0, 3000.0)), "t")
    rate_ax, eff_ax = fig.axes
    assert rate_ax.get_ylabel() == "samples/s" and eff_ax.get_ylabel() == "efficiency vs ideal (%)"
    assert [line.get_label() for line in rate_ax.get_lines()] == ["measured", "ideal (linear in ranks)"]
    assert list(rate_ax.get_lines()[1].get_ydata()) == [1000.0, 2000.0, 4000.0]
    assert list(eff_ax.get_lines()[0].get_ydata()) == pytest.approx([100.0, 90.0, 75.0])
    assert list(eff_ax.get_lines()[1].get_ydata()) == [100, 100]  # the ideal line


def test_write_makes_a_real_png_and_the_figures_as_json(tmp_path):
    png = scaling.write(scaling.rows(points(1000.0, 1800.0)), tmp_path / "runs" / "dev", "dp-mlp")
    assert png.parent == tmp_path / "runs" / "dev" and png.name.startswith("scaling-dp-mlp-")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert (width, height) == (770, 660)  # 7 x 6 inches at 110 dpi: the figure above, not an empty file
    data = json.loads(png.with_suffix(".json").read_text())
    assert [(d["nodes"], d["efficiency"]) for d in data] == [(1, 1.0), (2, 0.9)]


# The series, with launch, watch and fetch replaced: sizes in turn, each to its end, refusals first.


class Series:
    def __init__(self, tmp_path, monkeypatch, states=("succeeded",) * 3):
        self.launched: list[int] = []
        self.cancelled: list[str] = []
        self.states = list(states)
        self.tmp_path = tmp_path

        def launch(inv, job):
            self.launched.append(job.spec.nodes)
            return runs.RunRecord(
                id=f"run{job.spec.nodes}",
                job=job.spec.name,
                node="node0",
                run_dir="/data/x",
                ranks=job.spec.ranks,
                max_steps=job.spec.max_steps,
                started_at=datetime.now(UTC),
            )

        def watch(inv, record):
            view = monitor.RunView(record)
            view.status = {"state": self.states.pop(0), "started_at": 0, "reason": "rank 1 on node1 exited with code 2"}
            return view

        def fetch_metrics(inv, record, dest):
            folder = dest / inv.cluster / record.id
            folder.mkdir(parents=True)
            rate = 500.0 * record.ranks * (0.9 if record.ranks > 2 else 1.0)
            lines = [{"step": s, "throughput": rate, "time": s / 10} for s in (10, 20, 30)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
            return folder

        def cancel(inv, record):
            self.cancelled.append(record.id)

        monkeypatch.setattr(runs, "launch", launch)
        monkeypatch.setattr(monitor, "monitor", watch)
        monkeypatch.setattr(results, "fetch_metrics", fetch_metrics)
        monkeypatch.setattr(runs, "cancel", cancel)


DEMO = jobs.load(ROOT / "training_jobs" / "dp-mlp.yaml")


def test_each_size_runs_in_turn_and_the_png_lands_in_the_runs_folder(tmp_path, monkeypatch):
    series = Series(tmp_path, monkeypatch)
    measured, png = scaling.measure(make_inventory(gpu_nodes=4), DEMO, [1, 2, 4], steps=30, dest=tmp_path)
    assert series.launched == [1, 2, 4]
    assert [(r.point.ranks, r.point.throughput) for r in measured] == [(2, 1000.0), (4, 1800.0), (8, 3600.0)]
    assert [r.efficiency for r in measured] == pytest.approx([1.0, 0.9, 0.9])
    assert png.parent == tmp_path / "unit" and png.is_file()


def test_a_size_bigger_than_the_cluster_is_refused_before_any_run(tmp_path, monkeypatch):
    series = Series(tmp_path, monkeypatch)
    with pytest.raises(TrainrigError, match="asks for 4 nodes but cluster 'unit' has 2 GPU nodes"):
        scaling.measure(make_inventory(gpu_nodes=2), DEMO, [1, 2, 4], dest=tmp_path)
    assert series.launched == []


def test_a_size_that_fails_ends_the_series_with_its_cause(tmp_path, monkeypatch):
    series = Series(tmp_path, monkeypatch, states=["succeeded", "failed"])
    with pytest.raises(TrainrigError) as exc:
        scaling.measure(make_inventory(gpu_nodes=4), DEMO, [1, 2, 4], dest=tmp_path)
    assert str(exc.value) == (
        "the run at 2 node(s), run2, failed: rank 1 on node1 exited with code 2; see: fab logs --run run2 --name unit"
    )
    assert series.launched == [1, 2] and not list(tmp_path.glob("unit/scaling-*"))


def test_an_interrupt_cancels_the_run_under_way(tmp_path, monkeypatch):
    series = Series(tmp_path, monkeypatch)

    def interrupted(inv, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(monitor, "monitor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scaling.measure(make_inventory(gpu_nodes=4), DEMO, [1, 2], dest=tmp_path)
    assert series.cancelled == ["run1"] and series.launched == [1]
