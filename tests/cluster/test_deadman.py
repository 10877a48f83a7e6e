"""The dead-man switch's decisions on run files, durations, and what clusters it refuses."""

import json
import os
import time

import pytest

from cluster import deadman
from cluster.remote import deadman as remote
from infra.errors import TrainrigError
from infra.inventory import Inventory
from tests.helpers import KEY


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("2h", 7200), ("0s", 0), ("45", 45)])
def test_durations(text, seconds):
    assert deadman.parse_duration(text, "--idle") == seconds


@pytest.mark.parametrize("text", ["-5m", "5 m", "1.5h", "5d", "", "soon", "-3"])
def test_bad_durations_are_one_line_naming_the_flag(text):
    with pytest.raises(TrainrigError, match=r"^--grace .*write it like 90s, 5m or 2h$"):
        deadman.parse_duration(text, "--grace")


def run_dir(shared, name, state, ended_at=None, step_age=None):
    path = shared / "trainrig" / "runs" / name
    path.mkdir(parents=True)
    status = {"state": state, "started_at": time.time() - 1000}
    if ended_at is not None:
        status["ended_at"] = ended_at
    (path / "status.json").write_text(json.dumps(status))
    if step_age is not None:
        metrics = path / "metrics.jsonl"
        metrics.write_text('{"step": 1}\n')
        when = time.time() - step_age
        os.utime(metrics, (when, when))
    return path


def config(shared, **fields):
    now = time.time()
    return {"shared": str(shared), "hosts": ["node0"], "armed_at": now - 5, "up_since": now - 5, **fields}


def test_down_after_waits_for_a_final_state_and_the_grace(tmp_path):
    path = run_dir(tmp_path, "r1", "running", step_age=1)
    cfg = config(tmp_path, after_run={"id": "r1", "run_dir": str(path), "grace": 10})
    now = time.time()
    assert remote.verdict(cfg, now) is None
    for final in ("succeeded", "failed", "stalled", "cancelled"):
        (path / "status.json").write_text(json.dumps({"state": final, "ended_at": now - 3}))
        assert remote.verdict(cfg, now) is None  # inside the grace
        trigger, reason = remote.verdict(cfg, now + 8)
        assert trigger == "down-after" and f"run r1 {final}" in reason


def test_idle_counts_from_the_last_run_that_ended(tmp_path):
    now = time.time()
    run_dir(tmp_path, "old", "succeeded", ended_at=now - 100)
    run_dir(tmp_path, "new", "failed", ended_at=now - 20)
    assert remote.verdict(config(tmp_path, idle=30, armed_at=now - 1000), now) is None
    assert remote.verdict(config(tmp_path, idle=15, armed_at=now - 1000), now)[0] == "idle"
    # Arming counts as the start of quiet: a switch armed 5 s ago waits its whole idle time.
    assert remote.verdict(config(tmp_path, idle=15), now) is None


def test_a_run_going_is_not_idle_and_no_run_counts_from_arming(tmp_path):
    now = time.time()
    run_dir(tmp_path, "going", "running", step_age=1)
    assert remote.verdict(config(tmp_path, idle=1), now) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert remote.verdict(config(empty, idle=10), now) is None
    assert remote.verdict(config(empty, idle=4), now)[0] == "idle"


def test_stall_is_no_new_step_for_the_stall_time(tmp_path):
    now = time.time()
    run_dir(tmp_path, "slow", "running", step_age=40)
    assert remote.verdict(config(tmp_path, stall=60), now) is None
    trigger, reason = remote.verdict(config(tmp_path, stall=30), now)
    assert trigger == "stall" and "run slow logged no new step for 30s" in reason


def test_hard_limit_counts_from_when_the_compute_came_up(tmp_path):
    now = time.time()
    cfg = config(tmp_path, hard_limit=3600, up_since=now - 3500)
    assert remote.verdict(cfg, now) is None
    trigger, reason = remote.verdict(cfg, now + 100)
    assert trigger == "hard-limit" and "the limit is 1h" in reason


def inventory(cloud, tmp_path, storage=True):
    data = {
        "cluster": "c",
        "cloud": cloud,
        "ssh_user": "root",
        "ssh_private_key": str(tmp_path / "key"),
        "nodes": [
            {
                "name": "node0",
                "role": "gpu",
                "public_address": "1.2.3.4",
                "private_address": "10.0.0.2",
                "ssh_port": 22,
                "host_key": KEY,
                "gpu_count": 1,
                "cpus": 4,
                "hourly_price_usd": 1.0,
            }
        ],
        "storage": {"kind": "efs", "server": "10.0.0.3", "export": "/", "mount_point": "/data"} if storage else None,
    }
    return Inventory.model_validate(data)


CANCEL = {"TRAINRIG_IBM_CANCEL_USERNAME": "trainrig-cancel-c", "TRAINRIG_IBM_CANCEL_API_KEY": "sekrit-key"}


def ibm_inventory(inv: Inventory, ids=(4101, 4102)) -> Inventory:
    nodes = [n.model_copy(update={"cloud_id": str(ids[i])}) if n.role == "gpu" else n for i, n in enumerate(inv.nodes)]
    return inv.model_copy(update={"cloud": "ibm", "nodes": nodes})


def test_ibm_without_the_switch_credential_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(deadman.shutil, "which", lambda name: "/usr/bin/pulumi")
    for name in CANCEL:
        monkeypatch.delenv(name, raising=False)
    inv = ibm_inventory(inventory("ibm", tmp_path, storage=False))
    with pytest.raises(TrainrigError) as exc:
        deadman.require_verifiable(inv)
    assert str(exc.value) == (
        "on IBM Cloud classic the dead-man switch cancels 'c''s GPU servers with an API user of its own, which is "
        "not set: export TRAINRIG_IBM_CANCEL_USERNAME and TRAINRIG_IBM_CANCEL_API_KEY (or pulumi config set "
        "--secret cancel_username / cancel_api_key); README: IBM: the dead-man switch's credential"
    )
    monkeypatch.setenv("TRAINRIG_IBM_CANCEL_USERNAME", "u")
    monkeypatch.setenv("TRAINRIG_IBM_CANCEL_API_KEY", "k")
    with pytest.raises(TrainrigError, match="holds no IBM server id for node0"):
        deadman.require_verifiable(inventory("ibm", tmp_path, storage=False))


def test_arming_on_ibm_writes_the_credential_root_only_and_the_ids_to_the_config(ssh_cluster, monkeypatch, tmp_path):
    cluster = ssh_cluster(2)
    inv = ibm_inventory(cluster.inv)
    for name, value in {**CANCEL, "SL_USERNAME": "operator", "SL_API_KEY": "operator-key"}.items():
        monkeypatch.setenv(name, value)
    # The operator's own credentials: checked (they show the compute gone afterwards), never sent to the node.
    monkeypatch.setenv("SL_USERNAME", "operator")
    monkeypatch.setenv("SL_API_KEY", "operator-own-key")
    monkeypatch.setattr(deadman.shutil, "which", lambda name: "/usr/bin/pulumi")
    secret = cluster.share.parent / "etc" / "trainrig" / "deadman-credential.json"
    monkeypatch.setattr(deadman, "CREDENTIAL", str(secret))
    cluster.add_program("systemd-run", "exit 0")
    cluster.add_program("systemctl", "exit 0")
    cluster.add_program("ssh", "echo 'no mesh on IBM: the API cancels' >&2; exit 99")
    deadman.arm(inv, deadman.Settings(idle=600))
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.parent.stat().st_mode & 0o777 == 0o700
    assert json.loads(secret.read_text()) == {"username": "trainrig-cancel-c", "api_key": "sekrit-key"}
    base, _ = deadman.paths(inv)
    config = json.loads((cluster.share / "trainrig" / "deadman" / "config.json").read_text())
    assert config["softlayer"] == {
        "api": "https://api.softlayer.com/rest/v3.1/",
        "servers": {"node0": 4101, "node1": 4102},
    }
    assert config["credential"] == str(secret) and config["hosts"] == ["node0", "node1"]
    sent = secret.read_text() + json.dumps(config)
    assert "operator-own-key" not in sent and "sekrit-key" not in json.dumps(config)
    seen = "\n".join(c for server in cluster.servers.values() for c in server.commands)
    shared = "".join(p.read_text() for p in (cluster.share / "trainrig").rglob("*.json"))
    assert "sekrit-key" not in seen and "sekrit-key" not in shared and f"{base}/config.json" in seen
    assert "operator-key" not in secret.read_text() + shared + seen  # the operator's own key never goes
    # Disarming removes it from the node.
    deadman.arm(inv, deadman.Settings())
    assert not secret.exists()


def without_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))


def test_a_stack_cluster_without_the_pulumi_cli_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    monkeypatch.setattr(deadman.shutil, "which", lambda name: None)
    with pytest.raises(TrainrigError, match="without the Pulumi CLI its teardown cannot be checked"):
        deadman.require_verifiable(inventory("aws", tmp_path))
    monkeypatch.setattr(deadman.shutil, "which", lambda name: "/usr/bin/pulumi")
    deadman.require_verifiable(inventory("aws", tmp_path))
    with pytest.raises(TrainrigError, match="no shared storage"):
        deadman.require_verifiable(inventory("aws", tmp_path, storage=False))


@pytest.mark.parametrize("stack", [None, "aws-16-gpu"])
def test_a_cluster_whose_cloud_credentials_are_missing_is_refused(tmp_path, monkeypatch, stack):
    """Without them nothing can show the compute gone (pulumi refresh, fab down, fab audit)."""
    without_aws_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr(deadman.shutil, "which", lambda name: "/usr/bin/pulumi")
    inv = inventory("aws", tmp_path).model_copy(update={"stack": stack})
    with pytest.raises(
        TrainrigError, match=r"^AWS_ACCESS_KEY_ID: AWS credentials are missing; export AWS_ACCESS_KEY_ID"
    ):
        deadman.require_verifiable(inv)
    monkeypatch.setenv("AWS_PROFILE", "training")
    deadman.require_verifiable(inv)
    deadman.require_verifiable(inventory("local", tmp_path))  # a local cluster needs none


def test_a_gpu_node_the_switch_cannot_reach_is_refused_before_any_run(ssh_cluster):
    cluster = ssh_cluster(2)
    cluster.add_program("ssh", 'test "$7" = node1 && exit 255; exit 0')  # the mesh reaches node0 only
    with pytest.raises(TrainrigError) as exc:
        deadman.preflight(cluster.inv)
    assert str(exc.value) == (
        "storage cannot reach node1 over the cluster's SSH mesh, so it could not stop it: "
        "run fab provision --name unit --tags ssh_mesh"
    )
    cluster.add_program("ssh", "exit 0")
    deadman.preflight(cluster.inv)


def test_re_arming_keeps_a_down_after_run_only_while_it_runs(ssh_cluster):
    cluster = ssh_cluster(1)
    run = cluster.share / "trainrig" / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    after = {"id": "r1", "run_dir": str(run), "grace": 0}
    deadman.state.write_atomic(
        deadman.settings_path(cluster.inv.cluster), deadman.Settings(stall=60, after_run=after).model_dump_json()
    )
    kept = deadman.with_limits(cluster.inv, idle=600, stall=None, hard_limit=None)
    assert (kept.idle, kept.stall, kept.after_run) == (600, None, after)  # new limits replace the old ones
    (run / "status.json").write_text(json.dumps({"state": "succeeded", "ended_at": time.time()}))
    # That run is over (its compute may be gone already): re-arming must not fire on it at once.
    assert deadman.with_limits(cluster.inv, idle=600, stall=None, hard_limit=None).after_run is None


def test_fab_down_removes_the_switch_credential_from_the_storage_node(ssh_cluster, monkeypatch):
    cluster = ssh_cluster(1)
    secret = cluster.share.parent / "etc" / "deadman-credential.json"
    secret.parent.mkdir()
    secret.write_text("{}")
    monkeypatch.setattr(deadman, "CREDENTIAL", str(secret))
    cluster.add_program("systemctl", "exit 0")
    deadman.forget_credential(cluster.inv)  # local: no credential of its own, nothing touched
    assert secret.exists()
    deadman.forget_credential(ibm_inventory(cluster.inv))
    assert not secret.exists()
    assert any(c.startswith("systemctl stop trainrig-deadman") for c in cluster.servers["storage"].commands)


# -- parking instead of tearing down (trainrig:on_idle: park) -----------------------------------


def record(**fields):
    now = time.time()
    return {
        "by": "the dead-man switch on storage",
        "trigger": "idle",
        "reason": "no run going since 2026-01-01 10:00:00 UTC, the idle time is 10m",
        "at": now,
        "hosts": ["node0"],
        "compute_gone_at": now + 4,
        "still_up": [],
        **fields,
    }


def test_the_record_says_parked_or_torn_down():
    down = deadman.describe_record(record(action="down"))
    assert down.startswith("compute torn down by the dead-man switch on storage at ")
    assert down.endswith(
        "(idle): no run going since 2026-01-01 10:00:00 UTC, the idle time is 10m; every GPU node gone 4s later"
    )
    parked = deadman.describe_record(record(action="park"))
    assert parked.startswith("compute parked by the dead-man switch on storage at ")
    assert parked.endswith("; every GPU node stopped, disks kept, 4s later")
    # A record written before the switch knew of parking is a teardown.
    assert deadman.describe_record(record()).startswith("compute torn down by")


@pytest.mark.parametrize(("action", "expected"), [({"action": "park"}, "park"), ({}, "down")])
def test_the_switch_writes_its_action_into_the_record(tmp_path, action, expected):
    cfg = config(tmp_path, hosts=[], **action)  # no node to power off: the record alone
    path = tmp_path / "teardown.json"
    assert remote.teardown(cfg, str(path), "idle", "quiet") == 0
    written = json.loads(path.read_text())
    assert written["action"] == expected and written["compute_gone_at"] is not None


def test_the_summary_says_what_the_switch_does(tmp_path):
    inv = inventory("local", tmp_path)
    settings = deadman.Settings(idle=600)
    assert deadman.summary(inv, settings) == "dead-man switch on node0: idle 10m; it ends the GPU nodes"
    parks = inv.model_copy(update={"on_idle": "park"})
    assert deadman.summary(parks, settings) == "dead-man switch on node0: idle 10m; it parks the GPU nodes (disks kept)"
    assert deadman.summary(parks, deadman.Settings()) == "dead-man switch on node0: disarmed"


def test_a_cluster_the_switch_parked_reads_as_parked(ssh_cluster):
    cluster = ssh_cluster(1)
    inv = cluster.inv.model_copy(update={"on_idle": "park"})
    deadman.inventory_mod.save(inv)
    (cluster.share / "trainrig").mkdir()
    teardown = cluster.share / "trainrig" / "teardown.json"
    teardown.write_text(json.dumps(record(action="park", compute_gone_at=None)))
    assert deadman.settle(inv).parked_at is None  # not every node has stopped yet
    teardown.write_text(json.dumps(record(action="park")))
    parked = deadman.settle(inv)
    assert parked.parked_at is not None
    assert deadman.inventory_mod.load(inv.cluster).parked_at == parked.parked_at  # every later command sees it
    # A record from before the inventory (compute made since, on the kept storage) says nothing of it.
    older = inv.model_copy(update={"updated_at": inv.updated_at.fromtimestamp(time.time() + 60, inv.updated_at.tzinfo)})
    assert deadman.settle(older).parked_at is None
    # A teardown is not a park, and a cluster that tears down never reads the record.
    teardown.write_text(json.dumps(record(action="down")))
    assert deadman.settle(inv).parked_at is None
    cluster.servers["storage"].stop()
    assert deadman.settle(inv.model_copy(update={"on_idle": "down"})).parked_at is None


def test_a_run_whose_switch_cannot_be_armed_is_cancelled_not_left_billing(monkeypatch):
    """The checks passed, the run started, then arming failed (the storage node stopped answering):
    nothing would tear the compute down, so the run is cancelled and the line says why."""
    from cluster import runs
    from tests.helpers import make_inventory

    inv = make_inventory()
    record = runs.RunRecord.model_construct(id="r1", run_dir="/data/trainrig/runs/r1", node="node0")
    calls = []
    monkeypatch.setattr(deadman, "preflight", lambda inv: calls.append("preflight"))
    monkeypatch.setattr(deadman.runs, "launch", lambda inv, job, resume=None: calls.append("launch") or record)
    monkeypatch.setattr(deadman, "saved", lambda cluster: deadman.Settings())

    def refuse(inv, settings):
        calls.append(f"arm {settings.after_run['id']}")
        raise TrainrigError("storage: SSH connection refused")

    monkeypatch.setattr(deadman, "arm", refuse)
    monkeypatch.setattr(deadman.runs, "cancel", lambda inv, rec: calls.append(f"cancel {rec.id}") or {})
    with pytest.raises(
        TrainrigError,
        match=r"^the dead-man switch could not be armed \(storage: SSH connection "
        r"refused\), so run r1 was cancelled: fix that and run it again$",
    ):
        deadman.launch_run(inv, object(), down_after=0)
    assert calls == ["preflight", "launch", "arm r1", "cancel r1"]
