"""Role common's firewall step on the operator's own machine (connection local) against a stand-in ufw.

Where ufw guards a node (IBM classic, which has no security groups), only the cluster's own
nodes are let in, each by its private address, never the account-wide 10.0.0.0/8.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
NODES = [{"name": "node0", "private_address": "10.45.19.37"}, {"name": "storage", "private_address": "10.45.19.40"}]

FAKE_UFW = """#!/bin/sh
echo "$*" >> "{log}"
case "$1" in
  status) echo "Status: {status}" ;;
  allow) if grep -qx "allow from $3 .*" "{log}.rules" 2>/dev/null; then echo "Skipping adding existing rule";
         else echo "allow from $3 $4 $5" >> "{log}.rules"; echo "Rule added"; fi ;;
esac
"""


def run_firewall(tmp_path: Path, status: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "ufw.log"
    ufw = bin_dir / "ufw"
    ufw.write_text(FAKE_UFW.format(log=log, status=status))
    ufw.chmod(0o755)
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role: {name: common, tasks_from: firewall}\n"
    )
    venv_bin = Path(sys.executable).parent
    result = subprocess.run(
        [venv_bin / "ansible-playbook", "-i", "localhost,", str(play), "-e", json.dumps({"trainrig_nodes": NODES})],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
            "PATH": f"{bin_dir}:{venv_bin}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        },
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return log.read_text().splitlines() if log.exists() else []


def test_active_ufw_lets_in_exactly_the_cluster_nodes_and_twice_adds_nothing(tmp_path):
    calls = run_firewall(tmp_path, "active")
    assert calls == [
        "status",
        "allow from 10.45.19.37 comment trainrig cluster node",
        "allow from 10.45.19.40 comment trainrig cluster node",
    ]
    assert not any("10.0.0.0/8" in c for c in calls)
    again = run_firewall(tmp_path, "active")[len(calls) :]
    assert again[0] == "status" and len(again) == 3  # asked again; the rules exist, nothing new
    assert len((tmp_path / "ufw.log.rules").read_text().splitlines()) == 2


@pytest.mark.parametrize("status", ["inactive"])
def test_without_an_active_ufw_nothing_is_opened(tmp_path, status):
    assert run_firewall(tmp_path, status) == ["status"]
