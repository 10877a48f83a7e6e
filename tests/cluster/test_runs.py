"""Runs: records by id, launch over SSH and SFTP to in-process sshds, reading a run's files, cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from cluster import jobs, runs
from cluster.runs import RunRecord
from infra import ssh, state
from infra.errors import TrainrigError
from tests.helpers import make_inventory

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(run_id: str, minutes: int = 0, run_dir: str = "/data/trainrig/runs/x", **extra) -> RunRecord:
    return RunRecord(
        id=run_id,
        job=run_id.split("-")[0],
        node="node0",
        run_dir=run_dir,
        ranks=2,
        max_steps=None,
        started_at=T0 + timedelta(minutes=minutes),
        **extra,
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))


def remember(cluster: str, *ids: str) -> list[RunRecord]:
    made = [record(run_id, minutes=i) for i, run_id in enumerate(ids)]
    for r in made:
        runs._remember(cluster, r)
    return made


# Run records


def test_records_are_saved_in_order_and_read_back(home):
    assert runs.records("unit") == []
    made = remember("unit", "mnist-1", "mnist-2", "bert-1")
    assert runs.records("unit") == made
    assert runs.records("other") == []
    assert runs.records_path("unit").parent == state.cluster_dir("unit")


def test_records_from_before_the_nodes_field_still_load(home):
    old = record("mnist-1").model_dump(mode="json")
    del old["nodes"]
    runs.records_path("unit").parent.mkdir(parents=True)
    runs.records_path("unit").write_text(json.dumps([old]))
    assert runs.find("unit", "mnist-1").nodes == []


def test_find_without_an_id_is_the_latest(home):
    remember("unit", "mnist-1", "bert-1")
    assert runs.find("unit", None).id == "bert-1"


def test_find_by_unique_prefix_and_exact_id_before_prefix(home):
    remember("unit", "mnist-20260101-a", "mnist-20260101-ab", "bert-20260102-c")
    assert runs.find("unit", "bert").id == "bert-20260102-c"
    assert runs.find("unit", "mnist-20260101-ab").id == "mnist-20260101-ab"
    # Also a prefix of the longer id: the exact match wins.
    assert runs.find("unit", "mnist-20260101-a").id == "mnist-20260101-a"


@pytest.mark.parametrize("prefix", ["mnist", "gpt", "x"])
def test_ambiguous_or_unknown_prefixes_are_one_line(home, prefix):
    remember("unit", "mnist-1", "mnist-2", "bert-1", "bert-2")
    with pytest.raises(TrainrigError) as exc:
        runs.find("unit", prefix)
    assert str(exc.value) == f"no single run matches {prefix!r} on 'unit' (recent: mnist-2, bert-1, bert-2)"


def test_a_cluster_without_runs_says_how_to_start_one(home):
    with pytest.raises(TrainrigError, match=r"^cluster 'unit' has no runs yet; start one with: fab train --job "):
        runs.find("unit", "mnist")


# Launch


def write_job(tmp_path: Path, nodes: int, code: bool = True) -> jobs.LoadedJob:
    spec = {"name": "tiny", "command": ["python3", "train.py", "--out", "{checkpoint_dir}"], "nodes": nodes}
    if code:
        spec["code"] = "code"
        (tmp_path / "code" / "pkg" / "__pycache__").mkdir(parents=True)
        (tmp_path / "code" / "train.py").write_text("print('step 1 loss 0.5')\n")
        (tmp_path / "code" / "pkg" / "model.py").write_text("WIDTH = 3\n")
        (tmp_path / "code" / "pkg" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return jobs.load(path)


def untouched(cluster) -> bool:
    return all(server.connections == 0 for server in cluster.servers.values())


def test_a_job_wider_than_the_cluster_is_refused_before_any_node_is_touched(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    with pytest.raises(TrainrigError) as exc:
        runs.launch(cluster.inv, write_job(tmp_path, nodes=2))
    assert str(exc.value) == (
        "job 'tiny' asks for 2 nodes but cluster 'unit' has 1 GPU nodes;"
        " lower `nodes` or recreate the cluster with more (fab up --nodes 2)"
    )
    assert untouched(cluster)
    assert runs.records("unit") == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"ssh_user": "ubuntu"}, "cluster 'unit' logs in as 'ubuntu'; runs need the root login"),
        ({"storage": None}, "cluster 'unit' has no shared storage to hold runs"),
        ({"nodes": []}, "cluster 'unit' has no nodes running; start it with: fab up --name unit"),
    ],
)
def test_launch_refuses_clusters_it_cannot_run_on_before_touching_them(ssh_cluster, tmp_path, change, error):
    cluster = ssh_cluster(1)
    inv = cluster.inv.model_copy(update=change)
    with pytest.raises(TrainrigError) as exc:
        runs.launch(inv, write_job(tmp_path, nodes=1))
    assert str(exc.value).startswith(error)
    assert untouched(cluster)


def test_preflight_stops_a_launch_when_a_node_lacks_the_shared_storage(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    assert cluster.inv.storage is not None
    missing = cluster.inv.storage.model_copy(update={"mount_point": str(tmp_path / "not-mounted")})
    inv = cluster.inv.model_copy(update={"storage": missing})
    with pytest.raises(TrainrigError) as exc:
        runs.launch(inv, write_job(tmp_path, nodes=2))
    assert str(exc.value) == (
        f"pre-flight check failed: node0: shared storage {tmp_path / 'not-mounted'}"
        " or mpirun missing (run fab provision)"
    )
    assert not any("systemd-run" in c for s in cluster.servers.values() for c in s.commands)
    assert runs.records("unit") == []


def test_launch_copies_the_run_to_shared_storage_starts_it_on_the_first_node_and_remembers_it(ssh_cluster, tmp_path):
    cluster = ssh_cluster(3)
    started = tmp_path / "systemd-run.argv"
    cluster.add_program("systemd-run", f'printf "%s\\n" "$@" > {started}\n')
    job = write_job(tmp_path, nodes=2)

    rec = runs.launch(cluster.inv, job)

    assert rec.node == "node0" and rec.nodes == ["node0", "node1"] and rec.ranks == 2
    run_dir = Path(rec.run_dir)
    assert run_dir == cluster.share / "trainrig" / "runs" / rec.id
    assert rec.id.startswith("tiny-")
    # What the supervisor needs, on the share.
    assert (run_dir / "supervisor.py").read_text() == runs.SUPERVISOR.read_text()
    assert (run_dir / "job.yaml").read_text() == job.path.read_text()
    assert (run_dir / "checkpoints").is_dir()
    assert (run_dir / "code" / "train.py").read_text() == "print('step 1 loss 0.5')\n"
    assert (run_dir / "code" / "pkg" / "model.py").read_text() == "WIDTH = 3\n"
    assert not (run_dir / "code" / "pkg" / "__pycache__").exists()
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["id"] == rec.id
    assert run_json["workdir"] == f"{run_dir}/code"
    assert run_json["argv"] == jobs.mpirun_argv(job.spec, cluster.inv, str(run_dir))
    assert run_json["argv"][-4:] == ["python3", "train.py", "--out", f"{run_dir}/checkpoints"]
    # Started detached under systemd on the first node only, as a unit named after the run.
    assert started.read_text().splitlines() == [
        "--quiet",
        "--collect",
        "--unit",
        f"trainrig-run-{rec.id}",
        "--property",
        f"Description=trainrig run {rec.id}",
        "python3",
        f"{run_dir}/supervisor.py",
        str(run_dir),
    ]
    assert [any(c.startswith("systemd-run") for c in s.commands) for s in cluster.servers.values()] == [
        True,
        False,
        False,
        False,
    ]
    # Pre-flight probed exactly the job's nodes.
    assert [bool(s.commands) for s in cluster.servers.values()] == [True, True, False, False]
    assert runs.find("unit", None) == rec


def test_a_run_that_systemd_refuses_is_not_remembered(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    with pytest.raises(TrainrigError, match="starting the run under systemd failed: stand-in systemd-run"):
        runs.launch(cluster.inv, write_job(tmp_path, nodes=1, code=False))
    assert runs.records("unit") == []


# Reading a run's files


def test_status_and_metrics_files_are_read_over_sftp(ssh_cluster):
    cluster = ssh_cluster(1)
    run_dir = cluster.share / "trainrig" / "runs" / "tiny-1"
    run_dir.mkdir(parents=True)
    rec = record("tiny-1", run_dir=str(run_dir))
    metrics = run_dir / "metrics.jsonl"
    with ssh.open_checked(cluster.inv, cluster.inv.node("node0")) as conn:
        sftp = conn.sftp()
        assert runs.read_status(sftp, rec) is None  # not written yet
        (run_dir / "status.json").write_text('{"state": "runn')  # caught mid-write
        assert runs.read_status(sftp, rec) is None
        (run_dir / "status.json").write_text('{"state": "running", "started_at": 1}')
        assert runs.read_status(sftp, rec) == {"state": "running", "started_at": 1}

        assert runs.read_from(sftp, str(metrics), 0) == b""  # not there yet
        first = b'{"step": 1, "loss": 2.0}\n'
        metrics.write_bytes(first)
        assert runs.read_from(sftp, str(metrics), 0) == first
        with metrics.open("ab") as fh:
            fh.write(b'{"step": 2, "loss": 1.0}\n')
        assert runs.read_from(sftp, str(metrics), len(first)) == b'{"step": 2, "loss": 1.0}\n'
        assert runs.read_from(sftp, str(metrics), metrics.stat().st_size) == b""


def test_a_run_is_read_from_its_node_then_from_storage_once_compute_is_gone():
    inv = make_inventory(gpu_nodes=2)
    rec = record("tiny-1").model_copy(update={"node": "node1"})
    assert runs.reader_node(inv, rec).name == "node1"
    storage_only = inv.model_copy(update={"nodes": [inv.node("storage")]})
    assert runs.reader_node(storage_only, rec).name == "storage"
    assert inv.storage is not None
    efs = inv.model_copy(
        update={
            "nodes": [inv.node("node0")],
            "storage": inv.storage.model_copy(update={"kind": "efs", "server": "10.9.0.99"}),
        }
    )
    with pytest.raises(TrainrigError) as exc:
        runs.reader_node(efs, rec)
    assert str(exc.value) == "no node of 'unit' is up to read run tiny-1 from; start it with: fab up --name unit"


# Cancel


def cancelable(cluster, tmp_path) -> RunRecord:
    run_dir = cluster.share / "trainrig" / "runs" / "tiny-1"
    run_dir.mkdir(parents=True)
    return record("tiny-1", run_dir=str(run_dir), nodes=["node0", "node1"])


def test_cancel_of_an_ended_run_stops_nothing(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    rec = cancelable(cluster, tmp_path)
    (Path(rec.run_dir) / "status.json").write_text('{"state": "succeeded"}')
    assert runs.cancel(cluster.inv, rec, timeout=5, grace=0.5) == {"state": "succeeded"}
    assert not any("systemctl" in c for s in cluster.servers.values() for c in s.commands)


def test_cancel_stops_the_unit_waits_for_cancelled_and_kills_a_rank_that_outlives_the_grace(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    rec = cancelable(cluster, tmp_path)
    status = Path(rec.run_dir) / "status.json"
    status.write_text('{"state": "running"}')
    stopped = tmp_path / "systemctl.argv"
    # systemd stops the supervisor, which writes its last status; one rank ignores it all.
    cluster.add_program("systemctl", f'printf "%s\\n" "$@" > {stopped}\necho \'{{"state": "cancelled"}}\' > {status}\n')
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "TRAINRIG_RUN_DIR": rec.run_dir},
    )
    try:
        assert runs.cancel(cluster.inv, rec, timeout=10, grace=0.5) == {"state": "cancelled"}
        assert stray.wait(timeout=10) == -9
    finally:
        stray.kill()
    assert stopped.read_text().splitlines() == ["stop", "trainrig-run-tiny-1"]
