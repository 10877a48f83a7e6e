"""`fab plot`: a run's loss and throughput curves as a PNG, because a curve says more than a table."""

from __future__ import annotations

import json
from pathlib import Path

from infra.errors import TrainrigError


def read_telemetry(folder: Path) -> dict[str, list[dict]]:
    """Each host's samples from <run>/telemetry/<host>.jsonl; a line cut short by a copy mid-write is skipped."""
    hosts: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        samples = []
        for line in path.read_text().splitlines():
            try:
                samples.append(json.loads(line))
            except ValueError:
                continue
        if samples:
            hosts[path.stem] = samples
    return hosts


def plot_telemetry(run_dir: Path, title: str) -> Path | None:
    """Write <run_dir>/telemetry.png: GPU use, CPU and NIC MB/s per host over time; None without samples."""
    hosts = read_telemetry(run_dir / "telemetry")
    if not hosts:
        return None
    import matplotlib.pyplot as plt

    fig = telemetry_figure(hosts, title)
    out = run_dir / "telemetry.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def telemetry_figure(hosts: dict[str, list[dict]], title: str):
    """Three panels sharing time: mean GPU use, CPU and NIC MB/s, one line per host in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(s["time"] for samples in hosts.values() for s in samples)
    fig, (gpu_ax, cpu_ax, nic_ax) = plt.subplots(3, 1, sharex=True, figsize=(8, 7))
    for host, samples in hosts.items():
        t = [s["time"] - start for s in samples]
        gpu = [sum(g["util"] for g in s["gpus"]) / len(s["gpus"]) if s.get("gpus") else 0.0 for s in samples]
        gpu_ax.plot(t, gpu, label=host)
        cpu_ax.plot(t, [s.get("cpu", 0.0) for s in samples], label=host)
        nic_ax.plot(t, [s.get("nic_in_mbs", 0.0) + s.get("nic_out_mbs", 0.0) for s in samples], label=host)
    gpu_ax.set_ylabel("GPU use % (mean)")
    gpu_ax.set_title(title)
    cpu_ax.set_ylabel("CPU %")
    nic_ax.set_ylabel("NIC MB/s (in + out)")
    nic_ax.set_xlabel("seconds since the first sample")
    for ax in (gpu_ax, cpu_ax, nic_ax):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    gpu_ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise TrainrigError(f"{path} does not exist; bring the run home first with: fab fetch")
    from cluster.runs import parse_metric

    return [m for m in map(parse_metric, path.read_text(errors="replace").splitlines()) if m is not None]


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
