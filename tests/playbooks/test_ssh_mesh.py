"""Role ssh_mesh's check that every node reaches every other one, run on the operator's own machine
(each "node" is this machine, connection local) against a stand-in ssh that logs whom it was asked
to reach and refuses some peers the way a busy sshd does."""

from __future__ import annotations

from pathlib import Path

from tests.playbooks.local_role import run_tasks

NAMES = ["node0", "node1", "node2"]
NODES = [
    {"name": name, "private_address": f"10.0.0.{i + 1}", "host_key": "ssh-ed25519 AAAA"} for i, name in enumerate(NAMES)
]
REFUSED = "kex_exchange_identification: Connection closed by remote host"

# Logs the peer (the argument before the remote command), waits a second so that every node's
# first attempt is logged before any second one, then refuses the peers named in `always` every
# time and those in `once` on their first attempt only, as a busy sshd does.
STAND_IN_SSH = """#!/bin/sh
for a; do [ "$a" = true ] && break; peer=$a; done
echo "$peer" >> "{log}"
sleep 1
case " {always} " in *" $peer "*) echo "{refused}" >&2; exit 255 ;; esac
case " {once} " in *" $peer "*)
  if [ ! -e "{log}.$peer" ]; then touch "{log}.$peer"; echo "{refused}" >&2; exit 255; fi ;;
esac
exit 0
"""


def check_mesh(tmp_path: Path, always: str = "", once: str = "", retries: int = 3):
    log = tmp_path / "ssh.log"
    ssh = STAND_IN_SSH.format(log=log, always=always, once=once, refused=REFUSED)
    result = run_tasks(
        tmp_path,
        "ssh_mesh",
        "verify",
        {"ssh": ssh},
        {"ssh_mesh_nodes": NODES, "ssh_mesh_verify_retries": retries},
        hosts=tuple(NAMES),
        succeed=False,
    )
    return result, log.read_text().split()


def test_nodes_start_at_different_peers_and_a_refused_connection_is_tried_again(tmp_path):
    result, asked = check_mesh(tmp_path, once="node1")
    assert result.returncode == 0, result.stdout[-3000:]
    # Each node starts with the node after itself: the first attempts go to three different peers,
    # not all to node0 (sshd refuses connections beyond MaxStartups on a node everyone starts with).
    assert sorted(asked[:3]) == NAMES
    # Every node reaches all three, and node1's refusal of its first connection cost one more try.
    assert sorted(asked) == sorted(NAMES * 3 + ["node1"])


def test_a_peer_that_never_answers_fails_each_node_in_one_line_naming_it_and_why(tmp_path):
    result, asked = check_mesh(tmp_path, always="node2", retries=2)
    assert result.returncode != 0
    for name in NAMES:
        assert f"{name} cannot reach node2 by name over SSH: {REFUSED}" in result.stdout
    assert asked.count("node2") == 3 * (1 + 2)  # from each node: a first try and two more
