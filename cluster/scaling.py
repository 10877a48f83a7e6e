"""`fab scaling`: one job at several cluster sizes, one after the other, and its throughput against ideal scaling.

Each size is a run of its own (the job with `nodes` set to that size), watched to its end like
`fab train --follow`. Its throughput is read from the run's metrics: the median samples/s the
job logged, or steps/s from the step times when it logs no throughput. Ideal scaling is the
smallest size's throughput times the ratio of ranks; efficiency is the measured throughput
over that ideal. The table and a PNG (throughput and efficiency, each against ideal) go to
./runs/<cluster>/, with the figures as JSON beside them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from cluster import jobs, monitor, results, runs
from cluster.plot import read_metrics
from infra.errors import TrainrigError
from infra.inventory import Inventory


@dataclass(frozen=True)
class Point:
    """One size of the job and what it achieved."""

    nodes: int
    ranks: int
    throughput: float
    unit: str  # "samples/s", or "steps/s" when the job logs no throughput
    run_id: str


@dataclass(frozen=True)
class Row:
    point: Point
    speedup: float  # throughput over the smallest size's
    ideal: float  # the smallest size's throughput times the ratio of ranks
    efficiency: float  # throughput over ideal


def parse_sizes(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; each a positive whole number, each once, in increasing order."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise TrainrigError(f"--nodes {text!r}: give node counts separated by commas, e.g. --nodes 1,2,4") from None
    if not sizes or min(sizes) < 1 or sizes != sorted(set(sizes)):
        raise TrainrigError(f"--nodes {text!r}: give increasing node counts of at least 1, each once, e.g. 1,2,4")
    return sizes


def throughput_of(metrics: list[dict]) -> tuple[float, str]:
    """The run's throughput: the median of what it logged, the first interval left out (start-up is not speed)."""
    rates = [m["throughput"] for m in metrics if "throughput" in m]
    if len(rates) > 1:
        rates = rates[1:]
    if rates:
        return statistics.median(rates), "samples/s"
    timed = [(m["step"], m["time"]) for m in metrics if "time" in m]
    if len(timed) > 2:
        timed = timed[1:]
    if len(timed) >= 2 and timed[-1][1] > timed[0][1]:
        return (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1]), "steps/s"
    raise TrainrigError(
        "the run logged no throughput and too few steps to time; log samples/s or more steps (metrics patterns)"
    )


def rows(points: list[Point]) -> list[Row]:
    base = points[0]
    out = []
    for p in points:
        ideal = base.throughput * p.ranks / base.ranks
        out.append(Row(point=p, speedup=p.throughput / base.throughput, ideal=ideal, efficiency=p.throughput / ideal))
    return out


def table(job_name: str, measured: list[Row]) -> Table:
    unit = measured[0].point.unit
    out = Table(title=f"{job_name}: throughput by cluster size", title_justify="left")
    for column in ("nodes", "ranks", unit, "speed-up", "ideal", "efficiency", "run"):
        out.add_column(column, justify="left" if column == "run" else "right")
    for r in measured:
        out.add_row(
            str(r.point.nodes),
            str(r.point.ranks),
            f"{r.point.throughput:,.1f}",
            f"{r.speedup:.2f}x",
            f"{r.ideal:,.1f}",
            f"{r.efficiency:.0%}",
            r.point.run_id,
        )
    return out


def figure(measured: list[Row], title: str):
    """Two panels: throughput with the ideal line, and efficiency against 100 %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [r.point.nodes for r in measured]
    fig, (rate_ax, eff_ax) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    rate_ax.plot(nodes, [r.point.throughput for r in measured], "o-", label="measured")
    rate_ax.plot(nodes, [r.ideal for r in measured], "--", color="grey", label="ideal (linear in ranks)")
    rate_ax.set_ylabel(measured[0].point.unit)
    rate_ax.set_title(title)
    rate_ax.legend(loc="upper left", fontsize="small")
    eff_ax.plot(nodes, [100 * r.efficiency for r in measured], "o-", color="tab:orange", label="measured")
    eff_ax.axhline(100, linestyle="--", color="grey", label="ideal")
    eff_ax.set_ylabel("efficiency vs ideal (%)")
    eff_ax.set_xlabel("nodes")
    eff_ax.set_xticks(nodes)
    eff_ax.set_ylim(0, max(110, 10 + max(100 * r.efficiency for r in measured)))
    eff_ax.legend(loc="lower left", fontsize="small")
    for ax in (rate_ax, eff_ax):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def write(measured: list[Row], folder: Path, job_name: str) -> Path:
    """The PNG and the JSON of the figures, named after the job and the time; returns the PNG."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"scaling-{job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fig = figure(measured, f"{job_name}: throughput and efficiency against ideal")
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)
    data = [{**asdict(r.point), "speedup": r.speedup, "ideal": r.ideal, "efficiency": r.efficiency} for r in measured]
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    return stem.with_suffix(".png")


def at_size(job: jobs.LoadedJob, nodes: int, steps: int | None) -> jobs.LoadedJob:
    changes: dict = {"nodes": nodes}
    if steps:
        changes["max_steps"] = steps
    return job.model_copy(update={"spec": job.spec.model_copy(update=changes)})


def measure(
    inv: Inventory,
    job: jobs.LoadedJob,
    sizes: list[int],
    *,
    steps: int | None = None,
    dest: Path = Path("runs"),
    said: Callable[[str], None] = lambda line: None,
) -> tuple[list[Row], Path]:
    """Run the job at each size in turn, each to its end; the rows and the PNG.

    Every size is checked against the cluster before the first run starts. A run that does not
    succeed ends the series with its cause; an interrupt cancels the run under way.
    """
    for size in sizes:
        jobs.check_fits(at_size(job, size, steps).spec, inv)
    points = []
    for size in sizes:
        sized = at_size(job, size, steps)
        record = runs.launch(inv, sized)
        said(f"{size} node(s): run {record.id} ({record.ranks} ranks)")
        try:
            view = monitor.monitor(inv, record)
        except BaseException:
            runs.cancel(inv, record)  # nothing keeps running (and billing) behind an interrupt
            raise
        if view.state != "succeeded":
            raise TrainrigError(
                f"the run at {size} node(s), {record.id}, {view.state}: {view.reason or 'no reason given'}; "
                f"see: fab logs --run {record.id} --name {inv.cluster}"
            )
        local = results.fetch_metrics(inv, record, dest)
        try:
            throughput, unit = throughput_of(read_metrics(local / "metrics.jsonl"))
        except TrainrigError as exc:
            raise TrainrigError(f"run {record.id}: {exc}") from None
        points.append(Point(nodes=size, ranks=record.ranks, throughput=throughput, unit=unit, run_id=record.id))
    if len({p.unit for p in points}) > 1:
        raise TrainrigError("some sizes logged samples/s and others did not: the throughputs cannot be compared")
    measured = rows(points)
    return measured, write(measured, dest / inv.cluster, job.spec.name)
