"""A real local cluster end to end: VM-like nodes, provisioning, MPI training, fetch, teardown."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster import jobs, lifecycle, monitor, provision, results, runs
from infra import clouds, inventory, keys, ssh
from infra.errors import TrainrigError
from tests.integration.conftest import CLUSTER

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).parent / "fab"


def on(inv, name, *argv, check=True):
    with ssh.open_checked(inv, inv.node(name)) as conn:
        return ssh.run(conn, list(argv), check=check, timeout=120)


def fab(*args):
    return subprocess.run(
        [str(FAB), *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )


# -- nodes behave like VMs ---------------------------------------------------------------


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
    assert provisioned.failed_hosts == []
    assert all(r.ok > 0 for r in provisioned.hosts.values())
    again = provision.provision(cluster)
    assert {h: r.changed for h, r in again.hosts.items()} == {"node0": 0, "node1": 0, "storage": 0}


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
