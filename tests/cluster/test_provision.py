"""Provisioning settings: the Ansible inventory built from ours, speed settings, pinned keys."""

import pytest

from cluster import provision
from tests.helpers import make_inventory


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path))


def test_ansible_inventory_groups_and_vars():
    data = provision.ansible_inventory(make_inventory(gpu_nodes=2))["all"]
    assert data["hosts"]["node1"] == {"ansible_host": "127.0.0.1", "ansible_port": 2201, "trainrig_role": "gpu"}
    assert set(data["children"]["gpu"]["hosts"]) == {"node0", "node1"}
    assert set(data["children"]["storage"]["hosts"]) == {"storage"}
    assert data["vars"]["trainrig_nodes"][2] == {
        "name": "storage", "private_address": "10.9.0.12", "host_key": data["vars"]["trainrig_nodes"][0]["host_key"]
    }


def test_host_keys_stay_pinned_and_settings_are_fast():
    inv = make_inventory(gpu_nodes=8)
    env = provision.ansible_env(inv)
    assert "StrictHostKeyChecking=yes" in env["ANSIBLE_SSH_ARGS"]
    assert "StrictHostKeyChecking=no" not in env["ANSIBLE_SSH_ARGS"]
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    assert int(env["ANSIBLE_FORKS"]) >= len(inv.nodes)
    assert env["ANSIBLE_PIPELINING"] == "True" and "ControlPersist" in env["ANSIBLE_SSH_ARGS"]
    known_hosts = env["ANSIBLE_SSH_ARGS"].split("UserKnownHostsFile=")[1].split()[0]
    assert open(known_hosts).read().count("ssh-ed25519") == len(inv.nodes)


def test_recap_failed_hosts():
    recap = provision.Recap(hosts={"a": provision.HostRecap(ok=3), "b": provision.HostRecap(unreachable=1),
                                   "c": provision.HostRecap(failed=1)})
    assert recap.failed_hosts == ["b", "c"]
