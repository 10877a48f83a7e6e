"""`fab fetch` and plot's metrics: a run's files copied home over SFTP from in-process sshds."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cluster import results
from cluster.runs import RunRecord
from infra.errors import TrainrigError


def make_run(cluster, run_id: str = "tiny-20260101-000000-ab12") -> RunRecord:
    """A run directory on the share as a finished run leaves it, and its record (launched from node0)."""
    run_dir = cluster.share / "trainrig" / "runs" / run_id
    (run_dir / "checkpoints" / "step-10").mkdir(parents=True)
    (run_dir / "code" / "pkg").mkdir(parents=True)
    (run_dir / "train.log").write_text("step 1 loss 2.0\nstep 10 loss 0.5\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 10, "loss": 0.5}\n')
    (run_dir / "status.json").write_text('{"state": "succeeded"}')
    (run_dir / "checkpoints" / "step-10" / "model.bin").write_bytes(os.urandom(700_000))  # many SFTP reads
    (run_dir / "code" / "pkg" / "model.py").write_text("WIDTH = 3\n")
    (run_dir / "checkpoints" / "empty.txt").write_bytes(b"")
    return RunRecord(
        id=run_id,
        job="tiny",
        node="node0",
        run_dir=str(run_dir),
        ranks=2,
        max_steps=10,
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        nodes=["node0", "node1"],
    )


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fetch_copies_the_run_to_runs_cluster_run_id_from_the_storage_node(ssh_cluster, tmp_path, monkeypatch):
    cluster = ssh_cluster(2)
    rec = make_run(cluster)
    monkeypatch.chdir(tmp_path)

    dest = results.fetch(cluster.inv, rec)

    assert dest == Path("runs") / "unit" / rec.id
    assert tree(tmp_path / dest) == tree(Path(rec.run_dir))
    assert "checkpoints/empty.txt" in tree(tmp_path / dest)
    # Storage outlives compute: it is where results are read from while it is up.
    assert cluster.servers["storage"].connections == 1
    assert cluster.servers["node0"].connections == 0


def test_fetch_again_brings_the_newer_files(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    rec = make_run(cluster)
    dest = results.fetch(cluster.inv, rec, tmp_path / "home")
    (Path(rec.run_dir) / "train.log").write_text("step 20 loss 0.1\n")
    assert results.fetch(cluster.inv, rec, tmp_path / "home") == dest
    assert (dest / "train.log").read_text() == "step 20 loss 0.1\n"


def test_without_a_storage_node_fetch_reads_from_the_launch_node(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    rec = make_run(cluster)
    assert cluster.inv.storage is not None
    efs = cluster.inv.model_copy(
        update={
            "nodes": [n for n in cluster.inv.nodes if n.role == "gpu"],
            "storage": cluster.inv.storage.model_copy(update={"kind": "efs", "server": "10.9.0.99"}),
        }
    )
    dest = results.fetch(efs, rec, tmp_path / "home")
    assert tree(dest) == tree(Path(rec.run_dir))
    assert [cluster.servers[n].connections for n in ("node0", "node1", "storage")] == [1, 0, 0]


def test_fetch_of_a_run_whose_directory_is_gone_is_one_line(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    rec = make_run(cluster)
    gone = rec.model_copy(update={"run_dir": str(cluster.share / "trainrig" / "runs" / "purged")})
    with pytest.raises(TrainrigError) as exc:
        results.fetch(cluster.inv, gone, tmp_path / "home")
    assert str(exc.value) == (
        f"run {rec.id} has no directory {gone.run_dir} on storage; was the shared storage removed?"
    )
    assert not (tmp_path / "home").exists()


def test_fetch_metrics_copies_only_the_metrics(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    rec = make_run(cluster)
    dest = results.fetch_metrics(cluster.inv, rec, tmp_path / "home")
    assert dest == tmp_path / "home" / "unit" / rec.id
    assert tree(dest) == {"metrics.jsonl": (Path(rec.run_dir) / "metrics.jsonl").read_bytes()}


def test_fetch_metrics_of_a_run_without_metrics_keeps_the_copy_at_home(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    rec = make_run(cluster)
    dest = results.fetch_metrics(cluster.inv, rec, tmp_path / "home")
    fetched = (dest / "metrics.jsonl").read_bytes()
    (Path(rec.run_dir) / "metrics.jsonl").unlink()
    with pytest.raises(TrainrigError) as exc:
        results.fetch_metrics(cluster.inv, rec, tmp_path / "home")
    assert str(exc.value) == f"run {rec.id} has no {rec.run_dir}/metrics.jsonl on storage yet"
    assert (dest / "metrics.jsonl").read_bytes() == fetched
