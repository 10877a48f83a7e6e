"""`fab fetch`: bring a run's directory (checkpoints, log, metrics) home, with progress."""

from __future__ import annotations

import posixpath
import stat
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cluster import runs
from cluster.runs import RunRecord
from infra import ssh, ui
from infra.errors import TrainrigError
from infra.inventory import Inventory


def destination(inv: Inventory, record: RunRecord, root: Path = Path("runs")) -> Path:
    return root / inv.cluster / record.id


def fetch(inv: Inventory, record: RunRecord, root: Path = Path("runs")) -> Path:
    """Copy the run directory over SFTP, from storage when it is up (it outlives compute)."""
    dest = destination(inv, record, root)
    node = inv.storage_node or runs.reader_node(inv, record)
    with ssh.open_checked(inv, node) as conn:
        sftp = conn.sftp()
        try:
            files = list(_walk(sftp, record.run_dir))
        except FileNotFoundError:
            raise TrainrigError(
                f"run {record.id} has no directory {record.run_dir} on {node.name}; was the shared storage removed?"
            ) from None
        total = sum(size for _, size in files)
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()]
        with Progress(*columns, console=ui.console) as progress:
            task = progress.add_task(f"fetching {record.id}", total=total)
            for remote, _size in files:
                local = dest / posixpath.relpath(remote, record.run_dir)
                local.parent.mkdir(parents=True, exist_ok=True)
                done = progress.tasks[task].completed
                sftp.get(
                    remote,
                    str(local),
                    callback=lambda sent, _t, base=done: progress.update(task, completed=base + sent),
                )
    return dest


def _walk(sftp, top: str):
    for entry in sftp.listdir_attr(top):
        path = posixpath.join(top, entry.filename)
        if stat.S_ISDIR(entry.st_mode):
            yield from _walk(sftp, path)
        else:
            yield path, entry.st_size


def fetch_metrics(inv: Inventory, record: RunRecord, root: Path = Path("runs")) -> Path:
    """Just the run's metrics.jsonl (small; fine to repeat while the run goes on)."""
    dest = destination(inv, record, root)
    dest.mkdir(parents=True, exist_ok=True)
    node = inv.storage_node or runs.reader_node(inv, record)
    remote = f"{record.run_dir}/metrics.jsonl"
    with ssh.open_checked(inv, node) as conn:
        sftp = conn.sftp()
        try:
            sftp.stat(remote)  # before get, which would empty the copy at home first
        except FileNotFoundError:
            raise TrainrigError(f"run {record.id} has no {remote} on {node.name} yet") from None
        sftp.get(remote, str(dest / "metrics.jsonl"))
        # Telemetry too, for the per-host panels; a run from before the sampler has none.
        for host in record.nodes:
            sample = f"{record.run_dir}/telemetry/{host}.jsonl"
            try:
                sftp.stat(sample)
            except FileNotFoundError:
                continue
            (dest / "telemetry").mkdir(exist_ok=True)
            sftp.get(sample, str(dest / "telemetry" / f"{host}.jsonl"))
    return dest
