"""Role cluster_hosts's firewall step on the operator's own machine (connection local) against a stand-in ufw.

Where ufw guards a node (IBM classic, which has no security groups), only the cluster's own
nodes are let in, each by its private address, never the account-wide 10.0.0.0/8. ufw is read
only after cloud-init's first boot ends: on IBM its user data is what turns ufw on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.playbooks.local_role import run_tasks

NODES = [{"name": "node0", "private_address": "10.45.19.37"}, {"name": "storage", "private_address": "10.45.19.40"}]

FAKE_UFW = """#!/bin/sh
echo "$*" >> "{log}"
case "$1" in
  status) echo "Status: {status}"; printf '%s\\n' {listing} ;;
  allow) if grep -qx "allow from $3 .*" "{log}.rules" 2>/dev/null; then echo "Skipping adding existing rule";
         else echo "allow from $3 $4 $5" >> "{log}.rules"; echo "Rule added"; fi ;;
esac
"""

FAKE_CLOUD_INIT = """#!/bin/sh
echo "cloud-init $*" >> "$(dirname "$0")/../ufw.log"
"""


def run_firewall(tmp_path: Path, status: str, admin_cidr: str | None = None, listing: list[str] = ()) -> list[str]:
    log = tmp_path / "ufw.log"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    # One log for both stand-ins: the order of the calls is part of what is checked.
    quoted = " ".join(f"'{line}'" for line in listing) or "''"
    extra = {"trainrig_nodes": NODES, **({"trainrig_admin_cidr": admin_cidr} if admin_cidr else {})}
    stand_ins = {"ufw": FAKE_UFW.format(log=log, status=status, listing=quoted), "cloud-init": FAKE_CLOUD_INIT}
    run_tasks(tmp_path, "cluster_hosts", "firewall", stand_ins, extra)
    calls = log.read_text().splitlines()[before:]  # this run's
    assert calls.pop(0) == "cloud-init status --wait"  # first, every time
    return calls


def test_active_ufw_lets_in_exactly_the_cluster_nodes_and_twice_adds_nothing(tmp_path):
    calls = run_firewall(tmp_path, "active")
    assert calls == [
        "status",
        "allow from 10.45.19.37 comment trainrig cluster node",
        "allow from 10.45.19.40 comment trainrig cluster node",
    ]
    assert not any("10.0.0.0/8" in c for c in calls)
    again = run_firewall(tmp_path, "active")
    assert again[0] == "status" and len(again) == 3  # asked again; the rules exist, nothing new
    assert len((tmp_path / "ufw.log.rules").read_text().splitlines()) == 2


@pytest.mark.parametrize("status", ["inactive"])
def test_without_an_active_ufw_nothing_is_opened(tmp_path, status):
    assert run_firewall(tmp_path, status) == ["status"]


def test_a_changed_admin_cidr_opens_ssh_to_the_new_range_then_closes_the_old_ones(tmp_path):
    listing = [
        "22/tcp                     ALLOW       198.51.100.0/24            # trainrig-admin",
        "22/tcp                     ALLOW       203.0.113.7                # trainrig-admin",
        "Anywhere                   ALLOW       10.45.19.37                # trainrig cluster node",
    ]
    calls = run_firewall(tmp_path, "active", admin_cidr="203.0.113.7/32", listing=listing)
    opened = calls.index("allow from 203.0.113.7/32 to any port 22 proto tcp comment trainrig-admin")
    closed = calls.index("delete allow from 198.51.100.0/24 to any port 22 proto tcp")
    assert opened < closed  # never locked out in between
    # The current range (ufw prints a /32 as a bare address) and the cluster's rules stay.
    assert not any(c.startswith("delete") and ("203.0.113.7" in c or "10.45.19.37" in c) for c in calls)


def test_without_an_admin_cidr_the_ssh_rule_is_left_alone(tmp_path):
    listing = ["22/tcp                     ALLOW       198.51.100.0/24            # trainrig-admin"]
    calls = run_firewall(tmp_path, "active", listing=listing)
    assert not any("port 22" in c for c in calls)
