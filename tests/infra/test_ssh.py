"""SSH to nodes against real SSH servers in the test process: pinned keys, one-line errors, quoting, parallel work."""

from __future__ import annotations

import json
import sys
import time

import pytest

from infra import keys, ssh
from infra.errors import TrainrigError
from tests.sshd import free_port


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def test_the_pinned_host_key_is_accepted(ssh_cluster):
    cluster = ssh_cluster(1)
    node = cluster.inv.node("node0")
    with ssh.open_checked(cluster.inv, node) as conn:
        assert ssh.run(conn, ["echo", "hello"]).stdout == "hello\n"
    assert ssh.reachable(cluster.inv, node)


def test_another_host_key_is_refused_before_anything_runs(ssh_cluster):
    cluster = ssh_cluster(1)
    impostor = cluster.inv.node("node0").model_copy(update={"host_key": keys.bare(keys.generate().public_openssh)})
    inv = cluster.inv.model_copy(update={"nodes": [impostor]})
    with pytest.raises(TrainrigError) as exc:
        ssh.open_checked(inv, impostor)
    assert _one_line(exc) == "node0: host key does not match the pinned key in the inventory; refusing to connect"
    assert not ssh.reachable(inv, impostor)
    assert cluster.servers["node0"].commands == []


def test_a_refused_login_key_is_named(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    other = tmp_path / "other_key"
    other.write_text(keys.generate().private_openssh)
    other.chmod(0o600)
    inv = cluster.inv.model_copy(update={"ssh_private_key": other})
    with pytest.raises(TrainrigError) as exc:
        ssh.open_checked(inv, inv.node("node0"))
    assert _one_line(exc) == f"node0: the cluster key {other} was refused"


def test_a_port_nobody_listens_on_is_unreachable(ssh_cluster):
    cluster = ssh_cluster(1)
    port = free_port()
    node = cluster.inv.node("node0").model_copy(update={"ssh_port": port})
    inv = cluster.inv.model_copy(update={"nodes": [node]})
    with pytest.raises(TrainrigError) as exc:
        ssh.open_checked(inv, node, timeout=2)
    assert _one_line(exc).startswith(f"node0 unreachable at 127.0.0.1:{port}: ")
    assert not ssh.reachable(inv, node, timeout=2)


def test_arguments_arrive_intact_and_nothing_is_interpreted(ssh_cluster, tmp_path):
    cluster = ssh_cluster(1)
    canary = tmp_path / "interpreted"
    tricky = [
        "two words",
        'it\'s "quoted"',
        f"a; touch {canary}",
        f"$(touch {canary})",
        f"`touch {canary}`",
        "$HOME",
        "*",
        "line\nbreak",
        "",
        "back\\slash | pipe > redirect &",
    ]
    argv = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *tricky]
    with ssh.open_checked(cluster.inv, cluster.inv.node("node0")) as conn:
        result = ssh.run(conn, argv)
    assert json.loads(result.stdout) == tricky
    assert not canary.exists()


def test_a_failing_command_is_one_line_naming_it_and_the_node(ssh_cluster):
    cluster = ssh_cluster(1)
    node = cluster.inv.node("node0")
    failing = ["sh", "-c", "echo noise >&2; echo 'disk is full' >&2; exit 3"]
    with ssh.open_checked(cluster.inv, node) as conn:
        with pytest.raises(TrainrigError) as exc:
            ssh.run(conn, failing, what="writing the checkpoint")
        assert _one_line(exc) == f"127.0.0.1:{node.ssh_port}: writing the checkpoint failed: disk is full"
        with pytest.raises(TrainrigError) as unnamed:
            ssh.run(conn, failing)
        assert _one_line(unnamed) == f"127.0.0.1:{node.ssh_port}: sh failed: disk is full"
        assert ssh.run(conn, failing, check=False).exited == 3


def test_a_command_that_outlives_its_timeout(ssh_cluster):
    cluster = ssh_cluster(1)
    node = cluster.inv.node("node0")
    start = time.monotonic()
    with ssh.open_checked(cluster.inv, node) as conn, pytest.raises(TrainrigError) as exc:
        ssh.run(conn, ["sleep", "30"], timeout=1, what="waiting for the GPUs")
    assert time.monotonic() - start < 15
    assert _one_line(exc) == f"127.0.0.1:{node.ssh_port}: waiting for the GPUs did not finish within 1s"


def test_on_nodes_works_on_every_node_at_once(ssh_cluster):
    cluster = ssh_cluster(7)
    nodes = cluster.inv.nodes
    nap = 0.3

    def work(node):
        with ssh.open_checked(cluster.inv, node) as conn:
            return ssh.run(conn, ["sh", "-c", f'sleep {nap}; echo "$1"', "work", node.name]).stdout.strip()

    start = time.monotonic()
    results = ssh.on_nodes(nodes, work)
    elapsed = time.monotonic() - start
    assert results == {n.name: n.name for n in nodes}
    # One after another takes at least 8 * nap = 2.4 s; at once, one nap plus connecting (about 0.6 s here).
    assert elapsed < len(nodes) * nap * 0.75, f"{len(nodes)} nodes took {elapsed:.2f}s"


def test_on_nodes_results_follow_node_names_not_finishing_order(ssh_cluster):
    cluster = ssh_cluster(3)
    delays = {"node0": 0.3, "node1": 0.0, "node2": 0.15, "storage": 0.05}

    def work(node):
        time.sleep(delays[node.name])
        return node.ssh_port

    results = ssh.on_nodes(cluster.inv.nodes, work)
    assert list(results) == [n.name for n in cluster.inv.nodes]
    assert results == {n.name: n.ssh_port for n in cluster.inv.nodes}
    assert ssh.on_nodes([], work) == {}


def test_on_nodes_passes_a_node_error_on(ssh_cluster):
    cluster = ssh_cluster(2)
    down = cluster.inv.node("node1").model_copy(update={"ssh_port": free_port()})
    nodes = [cluster.inv.node("node0"), down]
    inv = cluster.inv.model_copy(update={"nodes": nodes})

    def work(node):
        with ssh.open_checked(inv, node, timeout=2) as conn:
            return ssh.run(conn, ["true"]).exited

    with pytest.raises(TrainrigError, match="^node1 unreachable at "):
        ssh.on_nodes(nodes, work)
