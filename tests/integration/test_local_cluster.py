"""A real local cluster end to end: VM-like nodes, provisioning, MPI training, fetch, teardown."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster import jobs, lifecycle, monitor, phases, provision, results, runs, tensorboard
from infra import clouds, inventory, keys, ssh
from infra.clouds.local import reaper
from infra.errors import TrainrigError
from tests.integration.conftest import CLUSTER

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).parent / "fab"


def on(inv, name, *argv, check=True):
    with ssh.open_checked(inv, inv.node(name)) as conn:
        return ssh.run(conn, list(argv), check=check, timeout=120)


def fab(*args, timeout=300):
    return subprocess.run(
        [str(FAB), *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=timeout
    )


# -- nodes behave like VMs ---------------------------------------------------------------


@pytest.mark.fresh_nodes  # before any test provisions the session's cluster (test_bake.py sorts first by name)
def test_nodes_are_vm_like(cluster):
    assert [n.name for n in cluster.nodes] == ["node0", "node1", "storage"]
    for node in cluster.nodes:
        assert on(cluster, node.name, "hostname").stdout.strip() == node.name
        assert on(cluster, node.name, "systemctl", "is-system-running", check=False).stdout.strip() in (
            "running",
            "degraded",
        )
        assert on(cluster, node.name, "systemctl", "is-active", "ssh").stdout.strip() == "active"
        # A blank data disk the node could format, like a fresh cloud volume.
        assert on(cluster, node.name, "blockdev", "--getsize64", "/dev/xvdc").stdout.strip() == str(1024**3)
        assert on(cluster, node.name, "blkid", "/dev/xvdc", check=False).exited == 2
        assert str(node.private_address) in on(cluster, node.name, "hostname", "-I").stdout


def test_ssh_is_published_on_loopback_only(cluster):
    for node in cluster.nodes:
        assert node.public_address == "127.0.0.1"
        ports = subprocess.run(
            ["docker", "port", f"trainrig-{cluster.cluster}-{node.name}", "22/tcp"], capture_output=True, text=True
        ).stdout.split()
        assert ports == [f"127.0.0.1:{node.ssh_port}"]


def test_shared_storage_is_the_same_on_every_node(cluster):
    on(cluster, "node0", "sh", "-c", "echo from-node0 > /data/shared-check")
    for name in ("node1", "storage"):
        assert on(cluster, name, "cat", "/data/shared-check").stdout.strip() == "from-node0"


def test_a_different_host_key_is_refused(cluster):
    impostor = keys.bare(keys.generate().public_openssh)
    nodes = [n.model_copy(update={"host_key": impostor}) if n.name == "node0" else n for n in cluster.nodes]
    tampered = cluster.model_copy(update={"nodes": nodes})
    with pytest.raises(TrainrigError, match="node0: host key does not match the pinned key"):
        ssh.open_checked(tampered, tampered.node("node0"))


# -- provisioning ------------------------------------------------------------------------


def test_provision_succeeds_then_changes_nothing(cluster, provisioned):
    # Under the default strategy, Mitogen's: the session's provisioning ran with it too.
    assert os.environ.get(provision.STRATEGY_ENV) is None
    assert provision.ansible_env(cluster)["ANSIBLE_STRATEGY"] == "mitogen_linear"
    assert provisioned.failed_hosts == []
    assert all(r.ok > 0 for r in provisioned.hosts.values())
    # Every task again, for real: the roles change nothing the second time.
    forced = provision.provision(cluster, force=True)
    assert {h: r.changed for h, r in forced.hosts.items()} == {"node0": 0, "node1": 0, "storage": 0}
    assert all(r.ok > 0 for r in forced.hosts.values())
    # Without --force no phase's inputs changed, so no task runs anywhere.
    again = provision.provision(cluster)
    assert all(r.ok == 0 and r.message.startswith("up to date") for r in again.hosts.values())


def test_ansibles_own_linear_strategy_changes_nothing_either(cluster, provisioned, monkeypatch):
    # The way back from Mitogen (TRAINRIG_ANSIBLE_STRATEGY=linear) runs the same roles to the same end.
    monkeypatch.setenv(provision.STRATEGY_ENV, "linear")
    forced = provision.provision(cluster, force=True)
    assert {h: r.changed for h, r in forced.hosts.items()} == {"node0": 0, "node1": 0, "storage": 0}
    assert all(r.ok > 0 for r in forced.hosts.values())


def test_gpu_nodes_fetch_packages_through_the_storage_nodes_cache(cluster, provisioned):
    storage = cluster.node("storage")
    cache = f"http://{storage.name}:{provision.APT_CACHE_PORT}"  # by name: /etc/hosts has it
    assert on(cluster, "node0", "/usr/local/lib/trainrig/apt-proxy").stdout.strip() == cache
    on(cluster, "node0", "apt-get", "update", "-qq")
    log = on(cluster, "storage", "cat", "/var/log/apt-cacher-ng/apt-cacher.log").stdout
    node0 = str(cluster.node("node0").private_address)
    assert any(f"|{node0}|" in line for line in log.splitlines()), log[-2000:]


def test_a_node_without_a_phase_record_runs_that_phase_alone(cluster, provisioned):
    on(cluster, "node1", "rm", f"{phases.RECORDS}/ssh_mesh")
    recap = provision.provision(cluster)
    assert recap.hosts["node0"].message.startswith("up to date")
    assert recap.hosts["storage"].message.startswith("up to date")
    assert 0 < recap.hosts["node1"].ok < provisioned.hosts["node1"].ok / 2
    assert recap.hosts["node1"].changed == 0
    assert "ssh_mesh" in on(cluster, "node1", "ls", phases.RECORDS).stdout.split()


def test_the_drift_check_finds_a_hand_edit_and_force_puts_it_back(cluster, provisioned):
    hosts = on(cluster, "node0", "cat", "/etc/hosts").stdout
    # /etc/hosts is bind-mounted into a local node: rewrite it in place.
    edit = "grep -v ' node1$' /etc/hosts > /tmp/hosts.edited && cat /tmp/hosts.edited > /etc/hosts"
    on(cluster, "node0", "sh", "-c", edit)
    try:
        drift = provision.check_drift(cluster)
        assert drift == {"node0": ["List every cluster node in /etc/hosts"]}
        assert " node1\n" not in on(cluster, "node0", "cat", "/etc/hosts").stdout  # check mode changed nothing
        # The records cannot see a hand edit; the drift check is how it is found.
        assert provision.provision(cluster).hosts["node0"].ok == 0
        result = fab("provision", "--name", CLUSTER, "--check-drift")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: drift on node0 (1 tasks); put it back with: fab provision --name {CLUSTER} --force"
        )
    finally:
        provision.provision(cluster, force=True)
    assert on(cluster, "node0", "cat", "/etc/hosts").stdout == hosts
    assert provision.check_drift(cluster) == {}


def test_etc_hosts_lists_every_node(cluster, provisioned):
    hosts = on(cluster, "node1", "cat", "/etc/hosts").stdout
    for node in cluster.nodes:
        assert f"{node.private_address} {node.name}" in hosts


def test_ssh_mesh_by_name_and_address_with_pinned_keys(cluster, provisioned):
    for src in cluster.nodes:
        for dst in cluster.nodes:
            assert on(cluster, src.name, "ssh", dst.name, "hostname").stdout.strip() == dst.name
    assert on(cluster, "node0", "ssh", str(cluster.node("node1").private_address), "hostname").stdout.strip() == "node1"
    # Without the pinned keys the same hop is refused: nothing is trusted on first use.
    refused = on(
        cluster,
        "node0",
        "ssh",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "node1",
        "true",
        check=False,
    )
    assert refused.exited != 0 and "Host key verification failed" in refused.stderr


# -- training ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def finished_run(cluster, provisioned):
    record = runs.launch(cluster, jobs.load(ROOT / "training_jobs" / "dp-mlp.yaml"))
    view = monitor.monitor(cluster, record, timeout=300)
    return record, view


def test_training_across_nodes_lowers_the_loss(cluster, finished_run):
    record, view = finished_run
    assert view.state == "succeeded", on(cluster, "node0", "cat", f"{record.run_dir}/train.log").stdout
    log = on(cluster, "storage", "cat", f"{record.run_dir}/train.log").stdout
    ranks_line = next(line for line in log.splitlines() if line.startswith("ranks:"))
    hosts = {entry.split("@")[1] for entry in ranks_line.split()[1:]}
    assert hosts == {"node0/container", "node1/container"}, ranks_line  # inside the job's image, on both nodes
    assert "world_size: 4" in log
    losses = view.losses()
    assert view.last["step"] == 300
    assert losses[-1] < losses[0] / 2
    assert view.last["throughput"] > 0


def test_run_is_detached_under_systemd(cluster, finished_run):
    record, _ = finished_run
    # The unit ran on the launch node, not in our SSH session (which closed before monitoring).
    journal = on(cluster, "node0", "journalctl", "--no-pager", "-u", record.unit, check=False).stdout
    assert record.id in journal or "Started" in journal


def test_fetch_brings_checkpoint_log_and_metrics_home(cluster, finished_run, tmp_path):
    record, view = finished_run
    dest = results.fetch(cluster, record, tmp_path / "runs")
    assert dest == tmp_path / "runs" / cluster.cluster / record.id
    latest = (dest / "checkpoints" / "latest").read_text().strip()
    checkpoint = np.load(dest / "checkpoints" / latest)
    assert int(checkpoint["step"]) == 300
    assert "final loss" in (dest / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (dest / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 300 and steps == sorted(steps)


def test_cli_status_logs_plot_and_monitor(cluster, finished_run, tmp_path):
    record, _ = finished_run
    status = fab("status", "--name", cluster.cluster)
    assert status.returncode == 0 and status.stdout.count("yes") == 3
    logs = fab("logs", "--run", record.id, "--name", cluster.cluster)
    assert logs.returncode == 0 and logs.stdout.startswith("ranks:")
    curves = fab("plot", "--run", record.id, "--name", cluster.cluster, "--dest", str(tmp_path))
    assert curves.returncode == 0, curves.stderr
    assert (tmp_path / cluster.cluster / record.id / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / cluster.cluster / record.id / "telemetry.png").read_bytes()[:4] == b"\x89PNG"
    watched = fab("monitor", "--name", cluster.cluster)
    assert watched.returncode == 0 and f"run {record.id} succeeded" in watched.stdout


def job_file(tmp_path, **changes) -> Path:
    """A variant of the demo job beside its own copy of the image's build folder."""
    shutil.copytree(ROOT / "training_jobs" / "dp_mlp", tmp_path / "dp_mlp", dirs_exist_ok=True)
    spec = {**yaml.safe_load((ROOT / "training_jobs" / "dp-mlp.yaml").read_text()), **changes}
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def containers_of(cluster, record, node: str) -> str:
    return on(cluster, node, "docker", "ps", "-aq", "--filter", f"label=trainrig.run={record.id}").stdout.strip()


def test_every_node_of_the_run_sampled_its_load(cluster, finished_run):
    record, _ = finished_run
    for node in record.nodes:
        lines = on(cluster, "storage", "cat", f"{record.run_dir}/telemetry/{node}.jsonl").stdout.splitlines()
        samples = [json.loads(line) for line in lines]
        assert samples and all(s["host"] == node and s["gpus"] is None for s in samples)  # local nodes: no GPU
        assert max(s["cpu"] for s in samples) > 0 and any(s.get("nic_in_mbs", 0) > 0 for s in samples)
        # The sampler stopped by itself with the run.
        assert on(cluster, node, "systemctl", "is-active", record.sampler_unit, check=False).exited != 0


def test_no_container_of_a_finished_run_is_left(cluster, finished_run):
    record, _ = finished_run
    assert record.image and record.image.startswith("sha256:")
    for node in ("node0", "node1"):
        assert containers_of(cluster, record, node) == "", f"container left on {node}"
        # The image reached every node (through the registry on the storage node), pinned to one id.
        assert on(cluster, node, "docker", "image", "inspect", record.image, check=False).exited == 0


def test_resume_continues_from_the_last_checkpoint(cluster, finished_run, tmp_path):
    record, _ = finished_run
    longer = job_file(tmp_path, max_steps=340)
    result = fab("train", "--job", str(longer), "--name", cluster.cluster, "--resume", record.id[:12], "--follow")
    assert result.returncode == 0, result.stderr
    resumed = runs.records(cluster.cluster)[-1]
    assert resumed.resumed_from == record.id and resumed.id != record.id
    log = on(cluster, "storage", "cat", f"{resumed.run_dir}/train.log").stdout
    assert "resumed from step 300" in log
    steps = [
        json.loads(line)["step"]
        for line in on(cluster, "storage", "cat", f"{resumed.run_dir}/metrics.jsonl").stdout.splitlines()
    ]
    assert min(steps) == 300 and steps[-1] == 340  # it logs where it resumed, then goes on
    # The continued run keeps its own checkpoints; the new one has its copy and its own newer ones.
    assert on(cluster, "storage", "test", "-e", f"{record.run_dir}/checkpoints/ckpt-step340.npz", check=False).exited
    assert on(cluster, "storage", "test", "-e", f"{resumed.run_dir}/checkpoints/ckpt-step340.npz").exited == 0


def test_a_frozen_node_fails_the_run_naming_it_and_no_rank_is_left(cluster, provisioned, tmp_path):
    health = {"node_check_every": 3, "stall_timeout": 30, "startup_grace": 120}
    record = runs.launch(cluster, jobs.load(job_file(tmp_path, name="frozen", max_steps=1_000_000, health=health)))
    with pytest.raises(TrainrigError, match="still running"):
        monitor.monitor(cluster, record, timeout=5)  # training: steps arrive
    frozen_at = time.monotonic()
    subprocess.run(["docker", "pause", f"trainrig-{cluster.cluster}-node1"], check=True)
    try:
        view = monitor.monitor(
            cluster.model_copy(update={"nodes": [cluster.node("node0"), cluster.node("storage")]}), record, timeout=120
        )
        detected = time.monotonic() - frozen_at
        # And from the operator's side, a frozen node is one line within seconds, never a hang.
        started = time.monotonic()
        with pytest.raises(TrainrigError, match=r"^node1 unreachable at "):
            ssh.open_checked(cluster, cluster.node("node1"), timeout=5).close()
        assert time.monotonic() - started < 20
    finally:
        subprocess.run(["docker", "unpause", f"trainrig-{cluster.cluster}-node1"], check=True)
    assert view.state == "failed" and view.reason.startswith("node1 unreachable since "), view.status
    # Goal: the fault to a final status within 30 s beyond the configured check interval.
    assert detected < health["node_check_every"] * 2 + 30, detected
    runs.cancel(cluster, record)  # node1 is back: its container goes too
    for node in ("node0", "node1"):
        assert containers_of(cluster, record, node) == "", f"container left on {node}"


@pytest.mark.kills_a_node  # run last: a killed local node cannot come back on its old address and port
def test_a_killed_node_fails_the_run_naming_it_and_no_rank_is_left(cluster, provisioned, tmp_path):
    health = {"node_check_every": 3, "stall_timeout": 30, "startup_grace": 120}
    record = runs.launch(cluster, jobs.load(job_file(tmp_path, name="killed", max_steps=1_000_000, health=health)))
    with pytest.raises(TrainrigError, match="still running"):
        monitor.monitor(cluster, record, timeout=5)  # training: steps arrive
    node1 = f"trainrig-{cluster.cluster}-node1"
    subprocess.run(["docker", "kill", node1], check=True, capture_output=True)
    killed_at = time.monotonic()
    survivors = cluster.model_copy(update={"nodes": [cluster.node("node0"), cluster.node("storage")]})
    view = monitor.monitor(survivors, record, timeout=120)
    detected = time.monotonic() - killed_at
    # Named by the supervisor's own check of the node, or by Open MPI's report of its lost daemon.
    assert view.state == "failed", view.status
    assert re.fullmatch(r"node1 (unreachable since \d\d:\d\d:\d\d|lost: its MPI daemon .*)", view.reason), view.reason
    assert detected < health["node_check_every"] * 2 + 30, detected
    # No rank is left: none on node0, and node1 is off.
    assert containers_of(survivors, record, "node0") == ""
    assert on(survivors, "node0", "pgrep", "-f", "train.py", check=False).exited == 1
    # Stopped, or already removed by the local cloud's watcher of stopped nodes: either way nothing runs there.
    running = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", node1], capture_output=True, text=True)
    assert running.stdout.strip() in ("false", ""), running.stdout
    # The operator's commands say the node is gone in one line, and cancel clears what answers.
    result = fab("cancel", "--run", record.id, "--name", cluster.cluster)
    assert "Traceback" not in result.stderr and "node1" in result.stdout + result.stderr


def test_a_stalled_run_is_final_everywhere_and_leaves_no_rank(cluster, provisioned, tmp_path):
    health = {"stall_timeout": 10, "startup_grace": 0, "node_check_every": 5}
    hang = "import time; print('step 1 loss 1.0', flush=True); time.sleep(3600)"
    job = job_file(tmp_path, name="stalls", max_steps=100, health=health, command=["python3", "-c", hang])
    started = time.monotonic()
    watched = fab("train", "--job", str(job), "--name", cluster.cluster, "--follow")
    record = runs.records(cluster.cluster)[-1]
    # fab monitor ends on it, with the cause in its last line, and fails.
    assert watched.returncode == 1, watched.stderr
    assert re.search(r"stalled after [0-9.]+s\b.*\(no new step for 10s \(last: step 1 at ", watched.stderr)
    assert time.monotonic() - started < 240
    # logs --follow ends too, and cancel stops nothing more.
    logs = fab("logs", "--run", record.id, "--name", cluster.cluster, "--follow", timeout=60)
    assert logs.returncode == 0 and "step 1 loss 1.0" in logs.stdout
    cancelled = fab("cancel", "--run", record.id, "--name", cluster.cluster, timeout=120)
    assert cancelled.returncode == 0 and f"run {record.id} stalled" in cancelled.stdout, cancelled.stderr
    for node in ("node0", "node1"):
        assert containers_of(cluster, record, node) == "", f"container left on {node}"
        assert on(cluster, node, "pgrep", "-f", "time.sleep", check=False).exited == 1, f"rank left on {node}"
        assert on(cluster, node, "systemctl", "is-active", record.sampler_unit, check=False).exited != 0


def test_garbage_in_a_metrics_line_does_not_end_the_run(cluster, provisioned, tmp_path):
    lines = ["step 1 loss 1.5", "step 8: loss estimate 3", "step 2 loss nope samples/s 1e999x", "step 3 loss 0.5"]
    job = job_file(
        tmp_path,
        name="garbage",
        nodes=1,
        gpus_per_node=1,
        max_steps=3,
        command=["python3", "-c", "\n".join(f"print({line!r}, flush=True)" for line in lines)],
    )
    result = fab("train", "--job", str(job), "--name", cluster.cluster, "--follow")
    assert result.returncode == 0, result.stderr
    record = runs.records(cluster.cluster)[-1]
    metrics = [
        json.loads(line)
        for line in on(cluster, "storage", "cat", f"{record.run_dir}/metrics.jsonl").stdout.splitlines()
    ]
    assert [(m["step"], m.get("loss")) for m in metrics] == [(1, 1.5), (8, None), (2, None), (3, 0.5)]
    assert not [m for m in metrics if "throughput" in m]  # "1e999x" is no rate


def test_scaling_runs_each_size_in_turn_against_ideal(cluster, provisioned, tmp_path):
    job = job_file(tmp_path, name="scaling")
    dest = tmp_path / "runs"
    result = fab(
        "scaling",
        "--job",
        str(job),
        "--nodes",
        "1,2",
        "--steps",
        "60",
        "--name",
        cluster.cluster,
        "--dest",
        str(dest),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "speed-up" in result.stdout and "efficiency" in result.stdout
    (png,) = (dest / cluster.cluster).glob("scaling-scaling-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(png.with_suffix(".json").read_text())
    assert [(d["nodes"], d["ranks"], d["unit"]) for d in data] == [(1, 2, "samples/s"), (2, 4, "samples/s")]
    assert all(d["throughput"] > 0 for d in data) and data[0]["efficiency"] == 1.0
    # One run per size, each finished, in order.
    sized = [r for r in runs.records(cluster.cluster) if r.job == "scaling"]
    assert [len(r.nodes) for r in sized] == [1, 2] and [r.id for r in sized] == [d["run_id"] for d in data]


def test_tensorboard_answers_on_loopback_only_through_the_tunnel(cluster, provisioned, tmp_path):
    # The demo image has no TensorBoard (it would add hundreds of MB): Python's own HTTP server stands in
    # for it over the same log folder, started by the same tensorboard.command mechanism.
    write = (
        "import os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
        "open(os.path.join(sys.argv[1], 'events.out.tfevents.1'), 'w').write('an event'); "
        "print('step 1 loss 1', flush=True)"
    )
    server = ["python3", "-m", "http.server", "--bind", "{host}", "--directory", "{tensorboard_dir}", "{port}"]
    job = job_file(
        tmp_path,
        name="board",
        nodes=1,
        gpus_per_node=1,
        max_steps=1,
        command=["python3", "-c", write, "{tensorboard_dir}"],
        tensorboard={"logdir": "tb", "command": server},
    )
    assert fab("train", "--job", str(job), "--name", cluster.cluster, "--follow").returncode == 0
    record = runs.records(cluster.cluster)[-1]
    probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"
    with tensorboard.serving(cluster, record, 0) as served:
        with urllib.request.urlopen(served.url + "events.out.tfevents.1", timeout=30) as answer:
            assert answer.read() == b"an event"
        # Only loopback listens, on node0 and here: another node cannot reach it, nor can any other address here.
        node0 = str(cluster.node("node0").private_address)
        assert on(cluster, "node0", "python3", "-c", probe, "127.0.0.1", str(served.node_port)).exited == 0
        assert on(cluster, "node1", "python3", "-c", probe, node0, str(served.node_port), check=False).exited != 0
        assert on(cluster, "node0", "python3", "-c", probe, node0, str(served.node_port), check=False).exited != 0
        here = subprocess.run(
            [sys.executable, "-c", tensorboard.LISTENERS, str(served.local_port)], capture_output=True
        )
        assert here.stdout.split() == [b"0100007F"]
    left = on(cluster, "node0", "docker", "ps", "-aq", "--filter", f"label=trainrig.tensorboard={record.id}")
    assert left.stdout.strip() == ""
    # The same run with the stock TensorBoard command: the demo image lacks it, and says so in one line.
    spec = yaml.safe_load(job.read_text())
    spec["tensorboard"] = {"logdir": "tb"}
    on(
        cluster,
        "storage",
        "sh",
        "-c",
        'printf "%s" "$1" > "$2"',
        "-",
        yaml.safe_dump(spec),
        f"{record.run_dir}/job.yaml",
    )
    refused = fab("tensorboard", "--run", record.id, "--name", cluster.cluster, "--port", "0")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "image has no tensorboard on its PATH" in refused.stderr


def test_failing_job_fails_the_monitor(cluster, provisioned, tmp_path):
    job = job_file(
        tmp_path,
        name="fails",
        max_steps=5,
        command=["python3", "-c", "import sys; print('step 1 loss 1.0'); sys.exit(4)"],
    )
    result = fab("train", "--job", str(job), "--name", cluster.cluster, "--follow")
    assert result.returncode == 1
    assert "failed" in result.stderr and "Traceback" not in result.stderr


def test_job_bigger_than_the_cluster_is_refused(cluster, provisioned, tmp_path):
    before = runs.records(cluster.cluster)
    result = fab("train", "--job", str(job_file(tmp_path, name="big", nodes=3)), "--name", cluster.cluster)
    assert result.returncode != 0
    assert f"asks for 3 nodes but cluster '{CLUSTER}' has 2 GPU nodes" in result.stderr
    assert runs.records(cluster.cluster) == before


def test_a_secret_is_never_written_down(cluster, provisioned, tmp_path):
    canary = "canary-" + os.urandom(8).hex()
    # Each rank checks the value by its hash, so the command line never holds the secret itself.
    digest = hashlib.sha256(canary.encode()).hexdigest()
    check = (
        "import hashlib, os, time; "
        f"assert hashlib.sha256(os.environ['CANARY_SECRET'].encode()).hexdigest() == '{digest}'; "
        "print('step 1 loss 1', flush=True); time.sleep(4)"
    )
    job = job_file(tmp_path, name="secret", max_steps=1, secrets=["CANARY_SECRET"], command=["python3", "-c", check])
    record = runs.launch(cluster, jobs.load(job), environ={**os.environ, "CANARY_SECRET": canary})
    try:
        seen = []
        for _ in range(6):  # while it runs: in no process listing on any node
            seen += [on(cluster, node, "ps", "-eo", "args").stdout for node in ("node0", "node1", "storage")]
            time.sleep(0.5)
        view = monitor.monitor(cluster, record, timeout=120)
    finally:
        runs.cancel(cluster, record)
    log = on(cluster, "storage", "cat", f"{record.run_dir}/train.log").stdout
    assert view.state == "succeeded", log  # every rank saw the secret, intact
    assert not any(canary in listing for listing in seen)
    written = on(cluster, "storage", "grep", "-rl", canary, record.run_dir, check=False)
    assert written.exited == 1 and written.stdout == "", written.stdout
    dest = results.fetch(cluster, record, tmp_path / "runs")
    assert not [p for p in dest.rglob("*") if p.is_file() and canary.encode() in p.read_bytes()]
    assert canary not in runs.records_path(cluster.cluster).read_text()
    for node in ("node0", "node1"):  # the tmpfs file went with the run
        assert on(cluster, node, "ls", f"/run/trainrig/{record.id}.env", check=False).exited != 0


def test_the_image_streams_node_to_node_without_a_registry(cluster, provisioned, tmp_path, monkeypatch):
    from cluster import images

    job = jobs.load(job_file(tmp_path, name="streamed"))
    monkeypatch.setattr(images, "registry", lambda inv: None)  # as on a cluster with EFS and no storage node
    first = images.ensure(cluster, job, cluster.gpu_nodes, "streamed-1", "/data/trainrig/streamed-1")
    on(cluster, "node1", "docker", "rmi", "-f", first)
    image = images.ensure(cluster, job, cluster.gpu_nodes, "streamed-2", "/data/trainrig/streamed-2")
    assert image == first  # built from cache on node0, then streamed to node1 over the mesh
    assert on(cluster, "node1", "docker", "image", "inspect", image, check=False).exited == 0


def test_preflight_names_the_node_whose_container_stopped(cluster, provisioned, tmp_path):
    from cluster import launch as launch_mod
    from cluster import preflight

    job = jobs.load(job_file(tmp_path, name="preflight"))
    record = runs.RunRecord(
        id="preflight-1",
        job="preflight",
        node="node0",
        run_dir="/data/trainrig/pf",
        ranks=4,
        max_steps=1,
        started_at="2026-01-01T00:00:00Z",
        nodes=["node0", "node1"],
    )
    paths = launch_mod.RunPaths(run_id=record.id, run_dir=record.run_dir, shared="/data", code=False)
    image = runs.images.ensure(cluster, job, cluster.gpu_nodes, record.id, record.run_dir)
    try:
        runs._start_containers(cluster, job.spec, cluster.gpu_nodes, paths, image, {}, {})
        on(cluster, "node1", "docker", "stop", "-t", "0", launch_mod.container_name(record.id))
        with pytest.raises(
            TrainrigError,
            match=r"pre-flight check of the image failed: node1: the run's container "
            r"is not running",
        ):
            preflight.containers(cluster, job.spec, cluster.gpu_nodes, paths, image)
    finally:
        assert runs.remove_containers(cluster, record) == []
    assert containers_of(cluster, record, "node1") == ""


# -- teardown ----------------------------------------------------------------------------


def test_down_keeps_storage_and_purge_removes_everything(home):
    name = f"{CLUSTER}-down"
    backend = clouds.get("local").backend()
    inv = lifecycle.up(name, gpu_nodes=1, data_disk_gb=1)
    try:
        on(inv, "node0", "sh", "-c", "echo kept > /data/survives")
        lifecycle.down(inv, purge=False)
        assert backend.billable(name) == [f"volume trainrig-{name}-shared"]
        kept = inventory.load(name)
        assert not kept.running and {r.kind for r in kept.retained} == {"disk", "volume"}
        assert fab("down", "--name", name).returncode == 0  # twice is fine

        # Data outlives compute: a new cluster of the same name sees it.
        inv = lifecycle.up(name, gpu_nodes=1, data_disk_gb=1)
        assert on(inv, "node0", "cat", "/data/survives").stdout.strip() == "kept"
    finally:
        result = fab("down", "--name", name, "--purge")
    assert result.returncode == 0, result.stderr
    assert backend.billable(name) == []
    assert not (home / "clusters" / name).exists()
    leftover = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=trainrig.cluster={name}", "-q"], capture_output=True, text=True
    ).stdout
    assert leftover == ""


def test_up_brings_back_restarted_and_stopped_nodes_with_their_keys(home):
    name = f"{CLUSTER}-back"
    inv = lifecycle.up(name, gpu_nodes=1, data_disk_gb=1)
    try:
        on(inv, "node0", "sh", "-c", "echo kept > /data/survives")
        # As after a host restart: the host watcher is gone (it would remove a GPU node that stops).
        reaper.stop(name)
        # A restarted container gets a new SSH port: the saved inventory no longer reaches it.
        subprocess.run(["docker", "restart", f"trainrig-{name}-node0"], check=True, capture_output=True)
        subprocess.run(["docker", "stop", f"trainrig-{name}-storage"], check=True, capture_output=True)
        result = fab("up", "--name", name)
        assert result.returncode == 0, result.stderr
        assert "storage: started" in result.stdout and "node0: now at 127.0.0.1:" in result.stdout
        back = inventory.load(name)
        assert [n.host_key for n in back.nodes] == [n.host_key for n in inv.nodes]  # the same pinned keys
        assert on(back, "node0", "cat", "/data/survives").stdout.strip() == "kept"
        assert on(back, "storage", "blockdev", "--getsize64", "/dev/xvdc").stdout.strip() == str(1024**3)
    finally:
        assert fab("down", "--name", name, "--purge").returncode == 0


def test_failed_up_leaves_nothing_behind(home, tmp_path):
    # No losetup on PATH: node creation fails after the network and volume exist; all rolled back.
    name = f"{CLUSTER}-fail"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").symlink_to(subprocess.run(["which", "docker"], capture_output=True, text=True).stdout.strip())
    result = subprocess.run(
        [str(FAB), "up", "--name", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": str(bin_dir)},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "losetup is not installed" in result.stderr
    assert clouds.get("local").backend().billable(name) == []
    assert not inventory.path_for(name).parent.exists()


def test_cancel_stops_every_rank_and_leaves_no_container(cluster, provisioned, tmp_path):
    record = runs.launch(cluster, jobs.load(job_file(tmp_path, name="long", max_steps=1_000_000)))
    with pytest.raises(TrainrigError, match="still running"):
        monitor.monitor(cluster, record, timeout=4)  # it is training: steps arrive, the run goes on
    result = fab("cancel", "--run", record.id, "--name", cluster.cluster)
    assert result.returncode == 0 and f"run {record.id} cancelled" in result.stdout, result.stderr
    for name in ("node0", "node1"):
        assert on(cluster, name, "pgrep", "-f", "train.py", check=False).exited == 1, f"ranks left on {name}"
        assert containers_of(cluster, record, name) == "", f"container left on {name}"
    assert fab("monitor", "--run", record.id, "--name", cluster.cluster).returncode == 1
