"""Phase records: which phases a node still needs, from the digest of each phase's inputs recorded on the node."""

import shutil
from pathlib import Path

import pytest
import yaml

from cluster import bake, phases, provision
from infra import keys
from tests.helpers import make_inventory, make_node

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "playbooks" / "site.yml"
FACTS = "6.1.0-28-amd64\nubuntu 22.04"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))


@pytest.fixture
def playbooks(tmp_path) -> Path:
    """A copy of the playbooks that a test may edit."""
    copy = tmp_path / "playbooks"
    shutil.copytree(ROOT / "playbooks", copy)
    return copy


def by_name(site: Path) -> dict[str, phases.Phase]:
    return {p.name: p for p in phases.phases(site)}


def test_the_phases_are_site_ymls_playbooks_in_order_with_their_roles():
    found = phases.phases(SITE)
    assert [p.name for p in found] == [
        "common",
        "cluster_hosts",
        "data_disk",
        "apt_cache",
        "apt_proxy",
        "nvidia_driver",
        "image_registry",
        "docker",
        "nvidia_container_toolkit",
        "nfs",
        "ssh_mesh",
        "registry_login",
    ]
    nfs = {p.relative_to(ROOT / "playbooks").parts[:2] for p in by_name(SITE)["nfs"].files}
    assert {("roles", "nfs_server"), ("roles", "nfs_client")} <= nfs
    assert ("roles", "docker") not in nfs
    # A role named by another role comes with it: the driver phase reads the GPU facts role.
    driver = {p.relative_to(ROOT / "playbooks").parts[:2] for p in by_name(SITE)["nvidia_driver"].files}
    assert ("roles", "gpu_facts") in driver


def test_a_digest_follows_the_phases_own_files_only(playbooks):
    site = playbooks / "site.yml"
    before = {name: phases.digest(p, {}, FACTS) for name, p in by_name(site).items()}
    handlers = playbooks / "roles" / "docker" / "handlers" / "main.yml"
    handlers.write_text(handlers.read_text() + "\n# edited\n")
    after = {name: phases.digest(p, {}, FACTS) for name, p in by_name(site).items()}
    assert {name for name in before if before[name] != after[name]} == {"docker"}


def test_a_digest_follows_the_variables_the_phase_reads_and_the_nodes_kernel():
    nfs, docker = by_name(SITE)["nfs"], by_name(SITE)["docker"]
    storage = {"trainrig_storage": {"server": "storage", "export": "/srv/trainrig"}}
    moved = {"trainrig_storage": {"server": "storage", "export": "/srv/elsewhere"}}
    assert phases.digest(nfs, storage, FACTS) != phases.digest(nfs, moved, FACTS)
    # The Docker phase never reads the storage's export: a change there does not rerun it.
    assert phases.digest(docker, storage, FACTS) == phases.digest(docker, moved, FACTS)
    # A variable nothing reads changes nothing; a new kernel changes every phase.
    assert phases.digest(nfs, {**storage, "unrelated_name": 1}, FACTS) == phases.digest(nfs, storage, FACTS)
    assert phases.digest(docker, storage, FACTS) != phases.digest(docker, storage, "6.8.0-1\nubuntu 22.04")


def test_due_runs_what_a_node_has_no_matching_record_for():
    inv = make_inventory(gpu_nodes=2)
    site = phases.phases(SITE)
    variables = {n.name: {"trainrig_cluster": "unit"} for n in inv.nodes}
    current = {p.name: phases.digest(p, variables["node0"], FACTS) for p in site}
    states = {
        "node0": phases.NodeState(FACTS, current),  # everything up to date
        "node1": phases.NodeState(FACTS, {**current, "docker": "old"}),  # docker's inputs changed
        "storage": None,  # did not answer: Ansible runs everything and reports it
    }
    to_run, digests = phases.due(inv, site, variables, states)
    # The storage node runs its own phases only: not the driver's, Docker's, the GPU side's of the cache.
    storage = [
        p.name
        for p in site
        if p.name not in ("apt_proxy", "nvidia_driver", "docker", "nvidia_container_toolkit", "registry_login")
    ]
    assert to_run == {"node0": [], "node1": ["docker"], "storage": storage}
    assert digests["node1"] == current and "storage" not in digests
    # A phase whose plays are all for the other role is never due: the package cache on a GPU node.
    states["node1"] = phases.NodeState(FACTS, {**current, "apt_cache": "old", "image_registry": "old"})
    assert phases.due(inv, site, variables, states)[0]["node1"] == []


def test_records_are_read_back_as_written_on_a_node(ssh_cluster, monkeypatch, tmp_path):
    cluster = ssh_cluster(1)
    records = tmp_path / "records"
    monkeypatch.setattr(phases, "READ", phases.READ.replace(phases.RECORDS, str(records)))
    monkeypatch.setattr(phases, "RECORDS", str(records))
    node = cluster.inv.node("node0")
    (fresh,) = phases.read_state(cluster.inv, [node]).values()
    assert fresh is not None and fresh.recorded == {} and fresh.host_facts  # kernel and OS of the node
    phases.record(cluster.inv, {"node0": {"common": "a1", "ssh_mesh": "b2"}})
    (again,) = phases.read_state(cluster.inv, [node]).values()
    assert again == phases.NodeState(fresh.host_facts, {"common": "a1", "ssh_mesh": "b2"})
    for server in cluster.servers.values():
        server.stop()
    assert phases.read_state(cluster.inv, [node]) == {"node0": None}


def test_every_phase_group_holds_the_nodes_due_for_it():
    inv = make_inventory(gpu_nodes=2)
    everyone = provision.ansible_inventory(inv)["all"]["children"]
    assert set(everyone["phase_docker"]["hosts"]) == {"node0", "node1", "storage"}
    some = provision.ansible_inventory(inv, due={"node1": ["docker"], "node0": []})["all"]["children"]
    assert set(some["phase_docker"]["hosts"]) == {"node1"}
    assert some["phase_common"]["hosts"] == {}


PHASE_PLAYBOOKS = sorted(p for p in (ROOT / "playbooks").glob("*.yml") if p.name != "site.yml")


@pytest.mark.parametrize("playbook", PHASE_PLAYBOOKS, ids=lambda p: p.name)
def test_every_play_of_a_phase_is_limited_to_its_group(playbook):
    for play in yaml.safe_load(playbook.read_text()):
        assert play["hosts"].endswith(f":&phase_{playbook.stem}"), f"{playbook.name}: {play['hosts']}"


def test_cached_facts_go_when_the_node_is_another_machine_or_boots_another_kernel():
    inv = make_inventory(gpu_nodes=1)
    cache = provision.facts_dir(inv.cluster)
    provision._forget_stale_facts(inv, {"node0": FACTS})
    (cache / "node0").write_text("{}")
    provision._forget_stale_facts(inv)  # same machine, nothing read from it: kept
    provision._forget_stale_facts(inv, {"node0": FACTS})
    assert (cache / "node0").exists()
    provision._forget_stale_facts(inv, {"node0": "6.8.0-1\nubuntu 22.04"})
    assert not (cache / "node0").exists()
    (cache / "node0").write_text("{}")
    replaced = inv.nodes[0].model_copy(update={"host_key": keys.bare(keys.generate().public_openssh)})
    other = inv.model_copy(update={"nodes": [replaced]})
    provision._forget_stale_facts(other)
    assert not (cache / "node0").exists()


def test_a_baked_nodes_portable_phases_stay_done_in_another_cluster():
    # Two clusters of one shape with nothing else alike: names, addresses, host keys, network.
    one = make_inventory(gpu_nodes=2, cluster="one")
    nodes = [make_node(n.name, role=n.role, index=40 + i) for i, n in enumerate(one.nodes)]
    nodes = [n.model_copy(update={"host_key": n.host_key[:-4] + "Zzzz"}) for n in nodes]
    other = make_inventory(gpu_nodes=2, cluster="other").model_copy(update={"nodes": nodes})
    seen = {
        inv.cluster: {
            p.name: phases.digest(p, provision.phase_variables(inv)["node0"], FACTS) for p in provision.PHASES
        }
        for inv in (one, other)
    }
    differ = {name for name in seen["one"] if seen["one"][name] != seen["other"][name]}
    rerun = differ & set(bake.PORTABLE)
    assert not rerun, f"these phases would run again on a baked node: {rerun}"
    # What names this cluster runs again: its hosts, its mesh (host keys), its storage.
    assert {"cluster_hosts", "ssh_mesh", "nfs"} <= differ
