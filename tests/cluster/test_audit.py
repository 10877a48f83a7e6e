"""fab audit on the local cloud with stand-in docker and losetup: what no inventory accounts for fails it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import audit
from infra import inventory, state
from tests.helpers import make_inventory

ROOT = Path(__file__).resolve().parents[2]
DOCKER = """#!/bin/sh
case "$1 $2" in
  "info "*) echo 27.0 ;;
  "container ls")
    printf 'trainrig-kept-node0 kept\\ntrainrig-kept-storage kept\\n'
    printf 'trainrig-kept-node5 kept\\ntrainrig-gone-node0 gone\\n' ;;
  "volume ls") printf 'trainrig-kept-shared kept\\ntrainrig-gone-shared gone\\n' ;;
  "network ls") printf 'trainrig-kept kept\\n' ;;
esac
"""


@pytest.fixture
def local_engine(tmp_path, monkeypatch):
    """A local account holding: cluster 'kept' (known; one node it does not list) and 'gone' (state lost)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(DOCKER)
    home = tmp_path / "home"
    disks = home / "clusters"
    (bin_dir / "losetup").write_text(
        f"#!/bin/sh\necho '/dev/loop3 {disks}/kept/disks/node0.img'\necho '/dev/loop4 {disks}/gone/disks/node0.img'\n"
    )
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TRAINRIG_HOME", str(home))
    inventory.save(make_inventory(gpu_nodes=1, cluster="kept"))
    return home


def test_known_clusters_only_and_a_node_the_inventory_lacks_is_unaccounted(local_engine):
    report = audit.audit(everything=False)
    rows = {(item.kind, item.id): ok for _, item, ok in report.found}
    assert rows == {
        ("container", "trainrig-kept-node0"): True,
        ("container", "trainrig-kept-storage"): True,
        ("container", "trainrig-kept-node5"): False,
        ("volume", "trainrig-kept-shared"): True,
        ("network", "trainrig-kept"): True,
        ("loop device", "/dev/loop3"): True,
    }


def test_all_finds_clusters_whose_state_was_lost(local_engine):
    left = {(item.cluster, item.kind) for _, item in audit.audit(everything=True).unaccounted}
    assert left == {("kept", "container"), ("gone", "container"), ("gone", "volume"), ("gone", "loop device")}


def test_fab_audit_exits_non_zero_naming_the_first_item(local_engine):
    fab = Path(sys.executable).parent / "fab"
    done = subprocess.run([str(fab), "audit"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: 1 billable item(s) that no inventory accounts for, first container")
    state.cluster_dir("kept")  # the state it read is untouched
    assert inventory.load("kept").nodes
