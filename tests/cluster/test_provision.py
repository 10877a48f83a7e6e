"""Provisioning settings: the Ansible inventory built from ours, speed settings, pinned keys."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster import provision
from infra import state
from infra.errors import TrainrigError
from infra.inventory import SharedStorage
from tests.helpers import make_inventory


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path))


def test_ansible_inventory_groups_and_vars():
    data = provision.ansible_inventory(make_inventory(gpu_nodes=2))["all"]
    assert {k: data["hosts"]["node1"][k] for k in ("ansible_host", "ansible_port", "trainrig_role")} == {
        "ansible_host": "127.0.0.1",
        "ansible_port": 2201,
        "trainrig_role": "gpu",
    }
    assert set(data["children"]["gpu"]["hosts"]) == {"node0", "node1"}
    assert set(data["children"]["storage"]["hosts"]) == {"storage"}
    assert data["vars"]["trainrig_nodes"][2] == {
        "name": "storage",
        "private_address": "10.9.0.12",
        "host_key": data["vars"]["trainrig_nodes"][0]["host_key"],
    }


def test_root_logins_need_no_sudo_and_other_logins_always_use_it():
    assert "ansible_become" not in provision.ansible_inventory(make_inventory())["all"]["vars"]
    assert provision.ansible_inventory(make_inventory(user="ubuntu"))["all"]["vars"]["ansible_become"] is True


def test_gpu_count_and_model_reach_the_roles():
    host = provision.ansible_inventory(make_inventory(gpu_count=2))["all"]["hosts"]["node0"]
    assert host["trainrig_gpu_count"] == 2 and "trainrig_gpu_model" in host


def test_host_keys_stay_pinned_and_settings_are_fast():
    inv = make_inventory(gpu_nodes=8)
    env = provision.ansible_env(inv)
    assert "StrictHostKeyChecking=yes" in env["ANSIBLE_SSH_ARGS"]
    assert "StrictHostKeyChecking=no" not in env["ANSIBLE_SSH_ARGS"]
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    assert int(env["ANSIBLE_FORKS"]) >= len(inv.nodes)
    assert env["ANSIBLE_PIPELINING"] == "True" and "ControlPersist" in env["ANSIBLE_SSH_ARGS"]
    known_hosts = env["ANSIBLE_SSH_ARGS"].split("UserKnownHostsFile=")[1].split()[0]
    assert Path(known_hosts).read_text().count("ssh-ed25519") == len(inv.nodes)


def test_mitogen_linear_is_the_default_strategy(monkeypatch):
    monkeypatch.delenv(provision.STRATEGY_ENV, raising=False)
    env = provision.ansible_env(make_inventory(gpu_nodes=2))
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear"
    # The folder Ansible loads the strategy from is Mitogen's, installed with trainrig.
    assert (Path(env["ANSIBLE_STRATEGY_PLUGINS"]) / "mitogen_linear.py").is_file()
    # Mitogen reaches the nodes with the same pinned settings.
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True" and "StrictHostKeyChecking=yes" in env["ANSIBLE_SSH_ARGS"]


@pytest.mark.parametrize("name", ["linear", "free"])
def test_ansibles_own_strategy_is_one_setting_away(monkeypatch, name):
    monkeypatch.setenv(provision.STRATEGY_ENV, name)
    env = provision.ansible_env(make_inventory(gpu_nodes=2))
    assert env["ANSIBLE_STRATEGY"] == name
    assert "ANSIBLE_STRATEGY_PLUGINS" not in env


def test_mitogen_free_and_an_unknown_strategy(monkeypatch):
    monkeypatch.setenv(provision.STRATEGY_ENV, "mitogen_free")
    env = provision.ansible_env(make_inventory())
    assert (Path(env["ANSIBLE_STRATEGY_PLUGINS"]) / "mitogen_free.py").is_file()
    monkeypatch.setenv(provision.STRATEGY_ENV, "fast")
    with pytest.raises(TrainrigError, match="TRAINRIG_ANSIBLE_STRATEGY='fast' is not a strategy trainrig runs"):
        provision.ansible_env(make_inventory())


def test_recap_failed_hosts():
    recap = provision.Recap(
        hosts={
            "a": provision.HostRecap(ok=3),
            "b": provision.HostRecap(unreachable=1),
            "c": provision.HostRecap(failed=1),
        }
    )
    assert recap.failed_hosts == ["b", "c"]


def test_inventory_carries_what_the_roles_read():
    data = provision.ansible_inventory(make_inventory(gpu_nodes=1), host_vars={"node0": {"data_disk_label": "x"}})[
        "all"
    ]
    assert data["hosts"]["node0"]["data_disk_label"] == "x"
    assert data["hosts"]["node0"]["trainrig_data_disks"] == [
        {"device": d.device, "size_gb": d.size_gb} for d in make_inventory(gpu_nodes=1).nodes[0].data_disks
    ]
    storage = data["vars"]["trainrig_storage"]
    assert storage["server"] == "storage" and storage["export"] and storage["server_address"]


def test_efs_storage_is_mounted_from_its_address_with_efs_options():
    inv = make_inventory(gpu_nodes=2)
    efs = inv.model_copy(
        update={
            "nodes": inv.gpu_nodes,
            "storage": SharedStorage(kind="efs", server="10.9.0.200", export="/", mount_point="/data"),
        }
    )
    data = provision.ansible_inventory(efs)["all"]
    assert data["vars"]["trainrig_storage"] == {
        "server": "",
        "server_address": "10.9.0.200",
        "export": "/",
        "mount_point": "/data",
        "mount_options": provision.EFS_MOUNT_OPTIONS,
    }
    assert "nfsvers=4.1" in provision.EFS_MOUNT_OPTIONS and "x-systemd.automount" in provision.EFS_MOUNT_OPTIONS
    assert data["children"]["storage"]["hosts"] == {}


def test_no_storage_node_means_no_storage_vars():
    inv = make_inventory(gpu_nodes=1)
    bare = inv.model_copy(update={"storage": None})
    assert "trainrig_storage" not in provision.ansible_inventory(bare)["all"]["vars"]


def test_facts_once_per_host_and_predictable_control_sockets():
    env = provision.ansible_env(make_inventory(gpu_nodes=2))
    assert env["ANSIBLE_GATHERING"] == "smart"
    assert env["ANSIBLE_SSH_CONTROL_PATH"] == "%(directory)s/%%C"


def test_counts_are_ansibles_own_and_files_come_from_diffs():
    recap = provision.Recap(hosts={"a": provision.HostRecap()})
    progress = provision._Progress(type("Board", (), {"update": lambda *a: None})(), recap)
    # A no_log result is censored down to nothing: only Ansible's own recap knows it changed.
    progress(
        {"event": "runner_on_ok", "stdout": "changed: [a]", "event_data": {"host": "a", "res": {"censored": "hidden"}}}
    )
    progress(
        {
            "event": "runner_on_ok",
            "stdout": "ok: [a]",
            "event_data": {
                "host": "a",
                "res": {
                    "changed": False,
                    "diff": [
                        {"before_header": "/etc/x (content)", "after_header": "/etc/x (content)", "after": "new\n"}
                    ],
                },
            },
        }
    )
    progress({"event": "playbook_on_stats", "event_data": {"ok": {"a": 2}, "changed": {"a": 1}}})
    assert (recap.hosts["a"].ok, recap.hosts["a"].changed) == (2, 1)
    assert recap.hosts["a"].files == {"/etc/x": "new\n"}


def test_an_ignored_unreachable_peer_does_not_fail_the_host_but_a_real_one_does():
    recap = provision.Recap(hosts={"a": provision.HostRecap(), "b": provision.HostRecap()})
    progress = provision._Progress(type("Board", (), {"update": lambda *a: None})(), recap)
    # a read a key from a peer that is down (ignore_unreachable); b itself was down.
    for host in ("a", "b"):
        progress(
            {"event": "runner_on_unreachable", "event_data": {"host": host, "task": "Read", "res": {"msg": "down"}}}
        )
    assert recap.failed_hosts == ["a", "b"]
    progress({"event": "playbook_on_stats", "event_data": {"ok": {"a": 9}, "ignored": {"a": 1}, "dark": {"b": 1}}})
    assert recap.failed_hosts == ["b"] and recap.hosts["a"].message == "" and recap.hosts["a"].ok == 9


def test_cluster_vars_file_must_be_a_mapping(tmp_path):
    provision.cluster_vars_path("dev").parent.mkdir(parents=True, exist_ok=True)
    provision.cluster_vars_path("dev").write_text("- not a mapping\n")
    with pytest.raises(provision.TrainrigError, match="must be a mapping"):
        provision.cluster_vars("dev")


def test_a_broken_playbook_is_an_error_not_a_quiet_success(tmp_path, monkeypatch):
    # ansible-playbook stops before any host: no host failed, yet nothing was provisioned.
    (tmp_path / "roles").mkdir()
    (tmp_path / "broken.yml").write_text(
        "- name: Broken\n  hosts: all\n  tasks:\n    - ansible.builtin.debug: msg: x: y\n"
    )
    monkeypatch.setattr(provision, "PLAYBOOKS", tmp_path)
    with pytest.raises(provision.TrainrigError, match=r"^ansible-playbook did not run \(failed\): .*ERROR"):
        provision.provision(make_inventory(gpu_nodes=1), playbook="broken.yml")


@pytest.mark.parametrize("text", ['["node0"', '{"node0": 1}', "[1, 2]"])
def test_a_damaged_failed_host_list_says_which_file_and_what_to_do(tmp_path, text):
    path = provision.failed_hosts_path("unit")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(TrainrigError, match=r"provision-failed.json is damaged .*: delete it and provision every host"):
        provision.provision(make_inventory(), retry_failed=True)


LOCAL_PLAY = """- name: On the operator's machine, as each node
  hosts: all
  connection: local
  gather_facts: false
  tasks:
{tasks}
"""


def local_playbook(tmp_path, monkeypatch, tasks: str) -> str:
    """A playbook that runs for every node of the inventory on this machine (no SSH), through real Ansible."""
    (tmp_path / "roles").mkdir(exist_ok=True)
    (tmp_path / "local.yml").write_text(LOCAL_PLAY.format(tasks=tasks))
    monkeypatch.setattr(provision, "PLAYBOOKS", tmp_path)
    return "local.yml"


def test_a_failure_message_with_brackets_is_shown_as_text_and_recorded(tmp_path, monkeypatch):
    playbook = local_playbook(
        tmp_path,
        monkeypatch,
        '    - ansible.builtin.fail:\n        msg: "Could not get lock [/var/lib/apt/lists/lock]. Held by [bold]"',
    )
    with pytest.raises(provision.ProvisionFailed, match=r"Could not get lock \[/var/lib/apt/lists/lock\]"):
        provision.provision(make_inventory(gpu_nodes=1), playbook=playbook)
    assert json.loads(provision.failed_hosts_path("unit").read_text()) == ["node0", "storage"]


def test_ctrl_c_stops_ansible_and_leaves_every_unfinished_host_for_retry(tmp_path, monkeypatch):
    playbook = local_playbook(tmp_path, monkeypatch, "    - ansible.builtin.pause:\n        seconds: 120")
    started = time.monotonic()
    timer = threading.Timer(3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(TrainrigError, match=r"^provisioning interrupted: .*--retry-failed$") as err:
            provision.provision(make_inventory(gpu_nodes=2), playbook=playbook)
    finally:
        timer.cancel()
    assert err.value.exit_code == 130
    assert time.monotonic() - started < 30, "the playbook was stopped, not waited for"
    assert json.loads(provision.failed_hosts_path("unit").read_text()) == ["node0", "node1", "storage"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Ctrl-C again


def test_a_second_provision_of_a_busy_cluster_is_refused_at_once():
    busy = rf"^cluster unit is busy \(pid {os.getpid()}: fab up\); wait for it"
    with state.cluster_lock("unit", "up"), pytest.raises(TrainrigError, match=busy):
        provision.provision(make_inventory())


def test_the_stacks_admin_cidr_reaches_the_firewall_role_only_when_the_inventory_has_one():
    inv = make_inventory(gpu_nodes=1)
    assert "trainrig_admin_cidr" not in provision.ansible_inventory(inv)["all"]["vars"]
    ibm = inv.model_copy(update={"admin_cidr": "203.0.113.7/32"})
    assert provision.ansible_inventory(ibm)["all"]["vars"]["trainrig_admin_cidr"] == "203.0.113.7/32"
