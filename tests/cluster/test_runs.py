"""Runs: records by id, launch over SSH and SFTP to in-process sshds, reading a run's files, cancel."""

from __future__ import annotations

import json
import re
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


@pytest.mark.parametrize("text", ['[{"id": "x"', "{}", '[{"id": 1}]', "\x00\x01"])
def test_a_damaged_run_list_is_one_line_naming_the_file_and_what_to_do(home, text):
    path = runs.records_path("unit")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(TrainrigError) as err:
        runs.find("unit", None)
    message = str(err.value)
    assert message.startswith(f"{path} is damaged (") and "move it aside" in message and "\n" not in message


@pytest.mark.parametrize(
    "line, metric",
    [
        ('{"step": 3, "loss": 0.5, "time": 1.5}', {"step": 3, "loss": 0.5, "time": 1.5}),
        ('{"step": 3, "loss": "abc", "throughput": 10}', {"step": 3, "throughput": 10}),
        ('{"step": 5, "bleu": 21.5, "note": "x"}', {"step": 5, "bleu": 21.5}),  # the job's own metrics stay
        ('{"step": 4, "lo', None),
        ('{"step": "four", "loss": 1.0}', None),
        ('{"step": true, "loss": 1.0}', None),
        ("[1, 2]", None),
        ("", None),
    ],
)
def test_metric_lines_keep_their_numbers_and_skip_the_rest(line, metric):
    assert runs.parse_metric(line) == metric


def test_a_cluster_without_runs_says_how_to_start_one(home):
    with pytest.raises(TrainrigError, match=r"^cluster 'unit' has no runs yet; start one with: fab train --job "):
        runs.find("unit", "mnist")


# Launch


def write_job(tmp_path: Path, nodes: int, code: bool = True) -> jobs.LoadedJob:
    spec = {
        "name": "tiny",
        "image": {"pull": "example.org/tiny:1"},
        "command": ["python3", "train.py", "--out", "{checkpoint_dir}"],
        "nodes": nodes,
    }
    if code:
        spec["code"] = "code"
        (tmp_path / "code" / "pkg" / "__pycache__").mkdir(parents=True)
        (tmp_path / "code" / "train.py").write_text("print('step 1 loss 0.5')\n")
        (tmp_path / "code" / "pkg" / "model.py").write_text("WIDTH = 3\n")
        (tmp_path / "code" / "pkg" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return jobs.load(path)


IMAGE_ID = "sha256:" + "ab" * 32


def stand_in_node(cluster, log: Path, *, docker_info: int = 0, pull: int = 0, containers_left: str = "") -> None:
    """What a provisioned node answers: Docker, a mounted share, the private interface, a job image with Open MPI.

    Every docker command is logged to `log`, one argument list per line; systemd-run records to
    log.parent/systemd-run.
    """
    names = " ".join(cluster.servers)
    addresses = "".join(
        f"{i + 2}: eth0    inet {n.private_address}/24 scope global eth0\\n" for i, n in enumerate(cluster.inv.nodes)
    )
    cluster.add_program(
        "docker",
        f"""echo "$*" >> {log}
case "$1" in
  info) [ {docker_info} -eq 0 ] && echo 27.3.1; exit {docker_info} ;;
  pull) echo "Status: Downloaded newer image"; exit {pull} ;;
  image) echo {IMAGE_ID} ;;
  run) echo 0123456789ab ;;
  ps) printf '{containers_left}' ;;
  exec)
    shift 2
    case "$1" in
      mpirun) if [ "$2" = --version ]; then echo "mpirun (Open MPI) 4.1.5"; else printf '%s\\n' {names}; fi ;;
    esac ;;
esac
""",
    )
    cluster.add_program("mountpoint", "exit 0\n")
    cluster.add_program("df", "printf 'Avail\\n%s\\n' 99000000000\n")
    cluster.add_program("ip", f"printf '{addresses}'\n")
    cluster.add_program("systemd-run", f'printf "%s\\n" "$*" >> {log.parent / "systemd-run"}\n')


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


def test_preflight_names_every_node_without_docker_before_anything_is_made(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    stand_in_node(cluster, tmp_path / "docker.log", docker_info=1)
    with pytest.raises(TrainrigError) as exc:
        runs.launch(cluster.inv, write_job(tmp_path, nodes=2))
    assert str(exc.value) == (
        "pre-flight check of the hosts failed: node0: Docker is not running (run fab provision);"
        " node1: Docker is not running (run fab provision)"
    )
    assert not (cluster.share / "trainrig").exists()
    assert runs.records("unit") == []


def test_preflight_stops_a_launch_when_a_node_lacks_the_shared_storage(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    stand_in_node(cluster, tmp_path / "docker.log")
    (cluster.bin_dir / "mountpoint").unlink()  # the real one: a plain folder is no mount
    assert cluster.inv.storage is not None
    missing = cluster.inv.storage.model_copy(update={"mount_point": str(tmp_path / "not-mounted")})
    inv = cluster.inv.model_copy(update={"storage": missing})
    with pytest.raises(TrainrigError) as exc:
        runs.launch(inv, write_job(tmp_path, nodes=1))
    assert str(exc.value) == (
        f"pre-flight check of the hosts failed: node0: shared storage {tmp_path / 'not-mounted'}"
        " is not mounted (run fab provision)"
    )
    assert not (tmp_path / "not-mounted").exists()
    assert runs.records("unit") == []


def test_launch_copies_the_run_starts_containers_and_the_run_on_the_first_node_and_remembers_it(ssh_cluster, tmp_path):
    cluster = ssh_cluster(3)
    log = tmp_path / "docker.log"
    stand_in_node(cluster, log)
    job = write_job(tmp_path, nodes=2)

    rec = runs.launch(cluster.inv, job)

    assert rec.node == "node0" and rec.nodes == ["node0", "node1"] and rec.ranks == 2
    assert rec.image == IMAGE_ID
    run_dir = Path(rec.run_dir)
    assert run_dir == cluster.share / "trainrig" / "runs" / rec.id
    assert rec.id.startswith("tiny-")
    # What the supervisor and the samplers need, on the share; the code without its caches.
    assert (run_dir / "supervisor.py").read_text() == runs.SUPERVISOR.read_text()
    assert (run_dir / "sampler.py").read_text() == runs.SAMPLER.read_text()
    assert (run_dir / "job.yaml").read_text() == job.path.read_text()
    assert (run_dir / "checkpoints").is_dir()
    assert (run_dir / "code" / "train.py").read_text() == "print('step 1 loss 0.5')\n"
    assert (run_dir / "code" / "pkg" / "model.py").read_text() == "WIDTH = 3\n"
    assert not (run_dir / "code" / "pkg" / "__pycache__").exists()
    # The image pulled on both nodes, one container each from the same image id.
    docker = log.read_text().splitlines()
    assert docker.count("pull example.org/tiny:1") == 2
    started = [line for line in docker if line.startswith("run ")]
    assert len(started) == 2 and all(line.endswith(f"sleep {IMAGE_ID} infinity") for line in started)
    # mpirun runs in the first node's container, over both nodes, on the private network.
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["id"] == rec.id and run_json["hosts"] == ["node0", "node1"]
    assert run_json["argv"][:3] == ["docker", "exec", f"trainrig-{rec.id}"]
    mpirun = run_json["argv"][3:]
    assert mpirun[:6] == ["mpirun", "--allow-run-as-root", "-np", "2", "-H", "node0:1,node1:1"]
    assert mpirun[mpirun.index("-x") : mpirun.index("-x") + 2] == ["-x", "NCCL_SOCKET_IFNAME=eth0"]
    assert mpirun[-4:] == ["python3", "train.py", "--out", f"{run_dir}/checkpoints"]
    # Samplers on both nodes, the run detached under systemd on the first node only.
    units = (tmp_path / "systemd-run").read_text().splitlines()
    assert sorted(u.split()[3] for u in units if "sampler.py" in u) == [f"trainrig-telemetry-{rec.id}"] * 2
    assert [u for u in units if "supervisor.py" in u] == [
        f"--quiet --collect --unit trainrig-run-{rec.id} --property Description=trainrig run {rec.id}"
        f" python3 {run_dir}/supervisor.py {run_dir}"
    ]
    assert [any("supervisor.py" in c for c in s.commands) for s in cluster.servers.values()] == [
        True,
        False,
        False,
        False,
    ]
    assert [bool(s.commands) for s in cluster.servers.values()] == [True, True, False, False]
    assert runs.find("unit", None) == rec


def test_a_run_whose_image_cannot_be_pulled_leaves_no_container_and_no_record(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    log = tmp_path / "docker.log"
    stand_in_node(cluster, log, pull=1)
    with pytest.raises(TrainrigError, match=r"^node\d: docker pull example.org/tiny:1 failed"):
        runs.launch(cluster.inv, write_job(tmp_path, nodes=2))
    docker = log.read_text().splitlines()
    assert not [line for line in docker if line.startswith("run ")]
    # Both nodes were swept for containers of the run (found to remove, then checked gone).
    assert len([line for line in docker if line.startswith("ps -aq --filter label=trainrig.run=tiny-")]) == 4
    assert runs.records("unit") == []


def test_a_run_that_systemd_refuses_is_not_remembered_and_its_containers_go(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    log = tmp_path / "docker.log"
    stand_in_node(cluster, log)
    cluster.add_program("systemd-run", 'case "$*" in *supervisor.py*) echo "unit busy" >&2; exit 1;; esac\n')
    with pytest.raises(TrainrigError, match="starting the run under systemd failed"):
        runs.launch(cluster.inv, write_job(tmp_path, nodes=1, code=False))
    assert any(line.startswith("run ") for line in log.read_text().splitlines())
    assert any(line.startswith("ps -aq --filter label=trainrig.run=") for line in log.read_text().splitlines())
    assert runs.records("unit") == []


def test_ctrl_c_just_after_the_unit_started_leaves_no_unit_no_container_and_no_record(
    ssh_cluster, tmp_path, monkeypatch
):
    cluster = ssh_cluster(1)
    log = tmp_path / "docker.log"
    stand_in_node(cluster, log)
    cluster.add_program("systemctl", f'echo "$*" >> {tmp_path / "systemctl.log"}\n')
    real_run = ssh.run

    def interrupted_once_started(conn, argv, **kwargs):
        result = real_run(conn, argv, **kwargs)
        if argv[0] == "systemd-run" and any("supervisor.py" in str(a) for a in argv):
            raise KeyboardInterrupt  # the unit runs on the node; we never heard it started
        return result

    monkeypatch.setattr(ssh, "run", interrupted_once_started)
    with pytest.raises(KeyboardInterrupt):
        runs.launch(cluster.inv, write_job(tmp_path, nodes=1, code=False))
    stops = (tmp_path / "systemctl.log").read_text().splitlines()
    assert any(line.startswith("stop trainrig-run-tiny-") for line in stops), stops
    assert any(line.startswith("ps -aq --filter label=trainrig.run=") for line in log.read_text().splitlines())
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


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled", "stalled"])
def test_cancel_of_an_ended_run_stops_nothing_but_still_clears_its_containers(ssh_cluster, tmp_path, final):
    cluster = ssh_cluster(2)
    stand_in_node(cluster, tmp_path / "docker.log")
    cluster.add_program("systemctl", "exit 0\n")
    rec = cancelable(cluster, tmp_path)
    (Path(rec.run_dir) / "status.json").write_text(json.dumps({"state": final}))
    assert runs.cancel(cluster.inv, rec, timeout=5) == {"state": final}
    assert not any(f"systemctl stop {rec.unit}" in c for s in cluster.servers.values() for c in s.commands)
    swept = [line for line in (tmp_path / "docker.log").read_text().splitlines() if line.startswith("ps -aq")]
    assert len(swept) == 4  # each node: find them to remove, then check none is left


def test_cancel_stops_the_unit_waits_for_cancelled_and_removes_the_containers(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    stand_in_node(cluster, tmp_path / "docker.log")
    rec = cancelable(cluster, tmp_path)
    status = Path(rec.run_dir) / "status.json"
    status.write_text('{"state": "running"}')
    stopped = tmp_path / "systemctl.argv"
    # systemd stops the supervisor, which writes its last status.
    cluster.add_program(
        "systemctl",
        f'echo "$*" >> {stopped}\n[ "$2" = {rec.unit} ] && echo \'{{"state": "cancelled"}}\' > {status}\nexit 0\n',
    )
    assert runs.cancel(cluster.inv, rec, timeout=10) == {"state": "cancelled"}
    assert f"stop {rec.unit}" in stopped.read_text().splitlines()
    assert sorted(stopped.read_text().splitlines()).count(f"stop {rec.sampler_unit}") == 2


def test_cancel_says_where_a_container_outlived_it(ssh_cluster, tmp_path):
    cluster = ssh_cluster(2)
    stand_in_node(cluster, tmp_path / "docker.log", containers_left="0123456789ab\\n")
    cluster.add_program("systemctl", "exit 0\n")
    rec = cancelable(cluster, tmp_path)
    (Path(rec.run_dir) / "status.json").write_text('{"state": "failed"}')
    with pytest.raises(TrainrigError) as exc:
        runs.cancel(cluster.inv, rec, timeout=5)
    assert re.fullmatch(
        r"run tiny-1 stopped, but node\d: a container of the run is still there; run fab cancel again", str(exc.value)
    )
