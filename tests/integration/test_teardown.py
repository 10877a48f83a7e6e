"""Teardown from the cluster on a real local cluster: the dead-man switch fires on idle, stall, hard limit
and after a run; the GPU nodes go, storage stays, and the cluster comes back with its data."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import deadman, lifecycle, provision
from infra import inventory, ssh
from infra.clouds.local import reaper
from infra.commands import wait_until
from tests.integration.conftest import CLUSTER, remove_leftovers

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).parent / "fab"
NAME = f"{CLUSTER}-dm"[:31]


def fab(*args):
    return subprocess.run(
        [str(FAB), *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600
    )


def containers(role, cluster=NAME):
    """`name state` of the cluster's node containers of one role, stopped ones included."""
    return subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label=trainrig.cluster={cluster}",
            "--filter",
            f"label=trainrig.role={role}",
            "--format",
            "{{.Names}} {{.State}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")[:-1]


def bring_up():
    inv = lifecycle.up(NAME, gpu_nodes=1, data_disk_gb=1)
    provision.provision(inv, tags="common,ssh_mesh")
    return inv


@pytest.fixture(scope="module")
def dm(home):
    remove_leftovers(NAME)
    state = {"inv": bring_up()}
    try:
        yield state
    finally:
        lifecycle.down(inventory.load(NAME), purge=True)
        assert reaper.running(NAME) is None


def on_storage(inv, *argv):
    with ssh.open_checked(inv, inv.node("storage")) as conn:
        return ssh.run(conn, list(argv), timeout=60)


def fired(dm, trigger, settings):
    """Arm, then wait for the GPU node to be gone while the storage node stays; the record says why."""
    inv = dm["inv"]
    if not inv.gpu_nodes or not containers("gpu"):
        inv = dm["inv"] = bring_up()
    armed_at = time.time()
    deadman.arm(inv, settings, every=0.5)
    wait_until(lambda: not containers("gpu"), timeout=180, interval=0.5, what="the GPU node to be removed")
    gone_after = time.time() - armed_at
    assert containers("storage") == [f"trainrig-{NAME}-storage running"]
    record = deadman.teardown_record(inv)
    assert record["trigger"] == trigger
    assert record["by"] == "the dead-man switch on storage"
    assert record["compute_gone_at"] is not None
    # Nothing on the operator's side did it: no fab process, only the host watcher, which outlives fab.
    assert reaper.running(NAME)
    return record, gone_after


def test_fires_on_idle_and_keeps_storage(dm):
    on_storage(dm["inv"], "sh", "-c", "echo kept > /data/keep-me")
    record, after = fired(dm, "idle", deadman.Settings(idle=3))
    assert "the idle time is 3s" in record["reason"]
    assert after < 60
    status = fab("status", "--name", NAME)
    assert status.returncode == 0, status.stderr
    assert "compute torn down by the dead-man switch on storage" in status.stdout
    assert "(idle)" in status.stdout
    # The next up of the same name re-attaches the shared storage with its data.
    dm["inv"] = bring_up()
    assert on_storage(dm["inv"], "cat", "/data/keep-me").stdout.strip() == "kept"


def write_run(inv, name, status):
    on_storage(inv, "mkdir", "-p", f"/data/trainrig/runs/{name}")
    on_storage(inv, "sh", "-c", f"echo '{json.dumps(status)}' > /data/trainrig/runs/{name}/status.json")
    on_storage(inv, "sh", "-c", f"echo '{{\"step\": 1}}' > /data/trainrig/runs/{name}/metrics.jsonl")


def test_fires_on_a_stall(dm):
    write_run(dm["inv"], "stuck", {"state": "running", "started_at": time.time()})
    record, _ = fired(dm, "stall", deadman.Settings(stall=4))
    assert "run stuck logged no new step for 4s" in record["reason"]
    on_storage(dm["inv"], "rm", "-rf", "/data/trainrig/runs/stuck")


def test_fires_on_the_hard_limit(dm):
    record, _ = fired(dm, "hard-limit", deadman.Settings(hard_limit=5))
    assert "the limit is 5s" in record["reason"]


def test_down_after_a_run_then_down_and_up_work(dm):
    inv = dm["inv"] = bring_up()
    write_run(inv, "finishing", {"state": "running", "started_at": time.time()})
    settings = deadman.Settings(after_run={"id": "finishing", "run_dir": "/data/trainrig/runs/finishing", "grace": 2})
    deadman.arm(inv, settings, every=0.5)
    time.sleep(3)  # the run is still going: nothing may happen
    assert containers("gpu") == [f"trainrig-{NAME}-node0 running"]
    write_run(inv, "finishing", {"state": "succeeded", "started_at": time.time() - 5, "ended_at": time.time()})
    wait_until(lambda: not containers("gpu"), timeout=180, interval=0.5, what="the GPU node to be removed")
    record = deadman.teardown_record(inv)
    assert (record["trigger"], record["reason"].split(" at ")[0]) == ("down-after", "run finishing succeeded")
    down = fab("down", "--name", NAME)
    assert down.returncode == 0, down.stderr
    up = fab("up", "--name", NAME, "--nodes", "1", "--disk-gb", "1")
    assert up.returncode == 0, up.stderr
    dm["inv"] = inventory.load(NAME)
    assert containers("gpu") == [f"trainrig-{NAME}-node0 running"]


def test_down_after_is_refused_before_the_run_with_a_bad_grace():
    bad = fab("train", "--job", "training_jobs/dp-mlp.yaml", "--name", NAME, "--down-after", "--grace", "-5m")
    assert bad.returncode != 0
    assert bad.stderr.strip() == "error: --grace '-5m': not a duration; write it like 90s, 5m or 2h"


# -- park ----------------------------------------------------------------------------------

PARK = f"{CLUSTER}-park"[:31]


def test_a_parked_cluster_comes_back_with_its_disk_images_and_mesh_and_trains(home):
    """Parked, the GPU nodes are stopped (not removed); fab up starts them without provisioning again."""
    from cluster import jobs, monitor, runs

    remove_leftovers(PARK)
    inv = lifecycle.up(PARK, gpu_nodes=2, data_disk_gb=1)
    try:
        provision.provision(inv)
        job = jobs.load(ROOT / "training_jobs" / "dp-mlp.yaml")
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"max_steps": 20})})
        first = runs.launch(inv, job)
        assert monitor.monitor(inv, first, timeout=600).state == "succeeded"

        def on(node, *argv):
            with ssh.open_checked(inv, inv.node(node)) as conn:
                return ssh.run(conn, list(argv), timeout=60).stdout.strip()

        on("node0", "sh", "-c", "echo on-the-disk > /data1/park-check")
        images_before = on("node0", "docker", "images", "-q", "--no-trunc")
        parked = fab("park", "--name", PARK)
        assert parked.returncode == 0, parked.stderr
        states = subprocess.run(
            ["docker", "ps", "-a", "--filter", f"label=trainrig.cluster={PARK}", "--format", "{{.Names}} {{.State}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")[:-1]
        assert sorted(states) == [
            f"trainrig-{PARK}-node0 exited",
            f"trainrig-{PARK}-node1 exited",
            f"trainrig-{PARK}-storage running",
        ]
        refused = fab("train", "--job", "training_jobs/dp-mlp.yaml", "--name", PARK)
        assert "is parked; bring it back with: fab up" in refused.stderr
        up = fab("up", "--name", PARK)
        assert up.returncode == 0, up.stderr
        inv = inventory.load(PARK)
        assert inv.parked_at is None
        assert on("node0", "cat", "/data1/park-check") == "on-the-disk"
        assert on("node0", "docker", "images", "-q", "--no-trunc") == images_before
        assert on("node0", "ssh", "-o", "BatchMode=yes", "node1", "hostname") == "node1"
        second = runs.launch(inv, job)  # no provisioning in between
        assert monitor.monitor(inv, second, timeout=600).state == "succeeded"
    finally:
        lifecycle.down(inventory.load(PARK), purge=True)


# -- the switch parks instead (on_idle: park) --------------------------------------------------

PARKED_BY_SWITCH = f"{CLUSTER}-dp"[:31]


def test_the_switch_parks_on_idle_and_fab_up_brings_the_node_back_with_its_disk(home):
    """With on_idle park the switch's power-off stops the GPU node: the host watcher keeps the container and
    its disk, status says who parked it, cost bills it parked, and fab up resumes it with the disk's data."""
    name = PARKED_BY_SWITCH
    remove_leftovers(name)
    inv = lifecycle.up(name, gpu_nodes=1, data_disk_gb=1, on_idle="park")
    try:
        assert inv.on_idle == "park"
        provision.provision(inv, tags="common,data_disk,ssh_mesh")

        def on(node, *argv):
            with ssh.open_checked(inv, inv.node(node)) as conn:
                return ssh.run(conn, list(argv), timeout=60).stdout.strip()

        on("node0", "sh", "-c", "echo on-the-disk > /data1/park-check")

        armed_at = time.time()
        deadman.arm(inv, deadman.Settings(idle=3), every=0.5)
        wait_until(
            lambda: containers("gpu", name) == [f"trainrig-{name}-node0 exited"],
            timeout=180,
            interval=0.5,
            what="node0 to stop",
        )

        def complete_record():
            record = deadman.teardown_record(inv)
            return record if record and record.get("compute_gone_at") else None

        record = wait_until(complete_record, timeout=120, interval=1, what="the switch to see node0 gone")
        assert (record["trigger"], record["action"]) == ("idle", "park")
        stopped_after = record["compute_gone_at"] - armed_at
        print(f"parked {stopped_after:.1f}s after arming with idle 3s")
        assert stopped_after < 60
        log = reaper.log_path(name)
        wait_until(lambda: "parked by the dead-man switch" in log.read_text(), timeout=60, interval=0.5, what="watcher")
        assert containers("gpu", name) == [f"trainrig-{name}-node0 exited"], "a parked node is kept, not removed"

        status = fab("status", "--name", name)
        assert status.returncode == 0, status.stderr
        assert "compute parked by the dead-man switch on storage" in status.stdout
        assert "(idle)" in status.stdout and "parked since" in status.stdout
        assert inventory.load(name).parked_at is not None
        cost = fab("cost", "--name", name)
        assert cost.returncode == 0, cost.stderr
        assert any(line.split()[:3] == ["node0", "gpu", "parked"] for line in cost.stdout.splitlines()), cost.stdout
        refused = fab("train", "--job", "training_jobs/dp-mlp.yaml", "--name", name)
        assert "is parked; bring it back with: fab up" in refused.stderr

        # fab up arms the switch again with its saved limits: a longer idle time than the 3 s above, so the
        # node stays up while it is checked (a user's would be minutes).
        deadman.state.write_atomic(deadman.settings_path(name), deadman.Settings(idle=600).model_dump_json())
        up = fab("up", "--name", name)
        assert up.returncode == 0, up.stderr
        assert "dead-man switch on storage: idle 10m; it parks the GPU nodes" in up.stdout
        inv = inventory.load(name)
        assert inv.parked_at is None
        assert containers("gpu", name) == [f"trainrig-{name}-node0 running"]
        assert on("node0", "cat", "/data1/park-check") == "on-the-disk"
        assert deadman.teardown_record(inv) is None  # the old record is history now
    finally:
        lifecycle.down(inventory.load(name), purge=True)
