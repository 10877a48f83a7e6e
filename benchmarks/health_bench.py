"""How much watching a run costs and how fast it notices a fault, side by side. A script, not a test.

    .venv/bin/python -m benchmarks.health_bench [--name health-bench] [--watch 60] [--check-every 3]

It stands up a local cluster of two GPU-role nodes and a storage node, provisions it, and runs
the demo job across both nodes with `health.node_check_every` set to --check-every. Then:
- **sampler CPU**: the CPU time of the telemetry sampler on each node (its process and the
  children it waited for, from /proc/<pid>/stat) over --watch seconds of training, as % of one core;
- **telemetry age**: for --watch seconds it reads the telemetry as `fab monitor` does (the same
  function, once a second) and takes, per read and host, now minus the newest sample's time;
  the median and the maximum;
- **frozen node**: `docker pause` of node1 mid-run, then the time until status.json is final;
- **killed node**: a second run, `docker kill` of node1 mid-run, then the time until final.
The local nodes share one machine's clock, so sample times and our clock agree. The cluster is
removed at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from rich.table import Table

from cluster import jobs, lifecycle, monitor, provision, runs
from cluster.remote.sampler import FINAL
from infra import inventory, ssh, ui
from infra.clouds.local.instance import container_name
from infra.commands import wait_until

ROOT = Path(__file__).resolve().parents[1]


def demo_variant(folder: Path, name: str, check_every: int) -> jobs.LoadedJob:
    shutil.copytree(ROOT / "training_jobs" / "dp_mlp", folder / "dp_mlp", dirs_exist_ok=True)
    spec = yaml.safe_load((ROOT / "training_jobs" / "dp-mlp.yaml").read_text())
    spec.update(
        name=name,
        max_steps=10_000_000,
        health={"node_check_every": check_every, "stall_timeout": 60, "startup_grace": 300},
    )
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return jobs.load(path)


def first_step(inv, record) -> None:
    with ssh.open_checked(inv, inv.node(record.node)) as conn:
        sftp = conn.sftp()
        wait_until(
            lambda: runs.read_from(sftp, f"{record.run_dir}/metrics.jsonl", 0),
            timeout=600,
            interval=0.5,
            what=f"the first step of {record.id}",
        )


def sampler_cpu_seconds(inv, node_name: str, record) -> float:
    """User + system time of the node's sampler and of the children it waited for (nvidia-smi on GPU hosts)."""
    with ssh.open_checked(inv, inv.node(node_name)) as conn:
        pid = ssh.run(conn, ["systemctl", "show", "-p", "MainPID", "--value", record.sampler_unit]).stdout.strip()
        fields = ssh.run(conn, ["cat", f"/proc/{pid}/stat"]).stdout.rsplit(")", 1)[1].split()
        ticks = int(ssh.run(conn, ["getconf", "CLK_TCK"]).stdout)
    # After the ")" that ends the command name: field 3 is index 0, so utime (14) .. cstime (17) are 11..14.
    return sum(int(v) for v in fields[11:15]) / ticks


def watch(inv, record, seconds: float) -> tuple[dict[str, float], list[float]]:
    """Sampler CPU % of a core per node, and the telemetry ages `fab monitor` would have shown."""
    before = {n: sampler_cpu_seconds(inv, n, record) for n in record.nodes}
    started = time.monotonic()
    view = monitor.RunView(record)
    ages: list[float] = []
    with ssh.open_checked(inv, inv.node(record.node)) as conn:
        sftp = ssh.watched(conn, inv.node(record.node))
        monitor.read_telemetry(view, sftp)  # the history so far: not what a live read sees
        while time.monotonic() - started < seconds:
            time.sleep(1.0)  # fab monitor's own interval
            monitor.read_telemetry(view, sftp)
            now = time.time()
            ages += [now - sample["time"] for sample in view.hosts.values()]
    wall = time.monotonic() - started
    after = {n: sampler_cpu_seconds(inv, n, record) for n in record.nodes}
    return {n: 100.0 * (after[n] - before[n]) / wall for n in record.nodes}, ages


def time_to_final(inv, record, fault: list[str]) -> tuple[float, dict]:
    """Apply a fault to node1 (a docker command on its container) and time it until the run's status is final."""
    reader = inv.model_copy(update={"nodes": [n for n in inv.nodes if n.name != "node1"]})
    with ssh.open_checked(reader, reader.node(record.node)) as conn:
        sftp = conn.sftp()
        subprocess.run([*fault, container_name(inv.cluster, "node1")], check=True, capture_output=True)
        start = time.monotonic()
        status = wait_until(
            lambda: (s := runs.read_status(sftp, record)) and s.get("state") in FINAL and s,
            timeout=300,
            interval=0.25,
            what=f"a final status of {record.id}",
        )
    return time.monotonic() - start, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="health-bench")
    parser.add_argument("--watch", type=float, default=60.0, help="seconds of training to measure over")
    parser.add_argument("--check-every", type=int, default=3, help="health.node_check_every of the runs")
    args = parser.parse_args()
    os.environ.setdefault("TRAINRIG_HOME", tempfile.mkdtemp(prefix="trainrig-bench-"))
    folder = Path(tempfile.mkdtemp(prefix="health-bench-"))
    inv = lifecycle.up(args.name, gpu_nodes=2, data_disk_gb=1)
    try:
        provision.provision(inv)
        record = runs.launch(inv, demo_variant(folder, "bench-freeze", args.check_every))
        first_step(inv, record)
        cpu, ages = watch(inv, record, args.watch)
        try:
            frozen, frozen_status = time_to_final(inv, record, ["docker", "pause"])
        finally:
            subprocess.run(["docker", "unpause", container_name(inv.cluster, "node1")], capture_output=True)
        runs.cancel(inv, record)
        record = runs.launch(inv, demo_variant(folder, "bench-kill", args.check_every))
        first_step(inv, record)
        killed, killed_status = time_to_final(inv, record, ["docker", "kill"])
    finally:
        lifecycle.down(inventory.load(args.name), purge=True)

    table = Table(title=f"watching a run: cost and detection (node checks every {args.check_every} s)")
    for column in ("measure", "value", "goal"):
        table.add_column(column)
    for node, percent in cpu.items():
        table.add_row(f"sampler CPU on {node}", f"{percent:.2f} % of a core", "< 1 %")
    table.add_row(
        "telemetry age in fab monitor",
        f"median {statistics.median(ages):.2f} s, max {max(ages):.2f} s ({len(ages)} reads)",
        "<= 2 s",
    )
    beyond = args.check_every * 2  # two missed checks make a lost node: the configured part
    table.add_row(
        "frozen node -> final status",
        f"{frozen:.1f} s: {frozen_status['state']}, {frozen_status.get('reason')}",
        f"<= {beyond} + 30 s",
    )
    table.add_row(
        "killed node -> final status",
        f"{killed:.1f} s: {killed_status['state']}, {killed_status.get('reason')}",
        f"<= {beyond} + 30 s",
    )
    ui.console.print(table)


if __name__ == "__main__":
    main()
