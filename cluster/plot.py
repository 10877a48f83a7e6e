"""`fab plot`: a run's loss and throughput curves as a PNG, because a curve says more than a table."""

from __future__ import annotations

import json
from pathlib import Path

from infra.errors import TrainrigError


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise TrainrigError(f"{path} does not exist; bring the run home first with: fab fetch")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, title: str) -> Path:
    """Write <run_dir>/curves.png from <run_dir>/metrics.jsonl and return its path."""
    # Imported here: matplotlib costs most of a second, which every other `fab` task would pay.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir / "metrics.jsonl")
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    rates = [(m["step"], m["throughput"]) for m in metrics if "throughput" in m]
    if not losses and not rates:
        raise TrainrigError(
            f"{run_dir / 'metrics.jsonl'} holds no loss or throughput yet; check the job's metrics patterns"
        )
    fig, (loss_ax, rate_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=[2, 1])
    if losses:
        loss_ax.plot(*zip(*losses, strict=True), color="tab:blue")
        loss_ax.set_yscale("log" if min(v for _, v in losses) > 0 else "linear")
    loss_ax.set_ylabel("training loss")
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.set_title(title)
    if rates:
        rate_ax.plot(*zip(*rates, strict=True), color="tab:green")
    rate_ax.set_ylim(bottom=0)  # a dip should look like a dip, not like a collapse
    rate_ax.set_ylabel("samples/s")
    rate_ax.set_xlabel("step")
    rate_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
