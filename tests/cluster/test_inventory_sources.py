"""Inventories from a Pulumi stack's outputs or a saved file, validated, and cached with their pinned host keys."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cluster import inventory
from cluster.errors import TrainrigError

NODE = {"name": "storage", "role": "storage", "public_address": "203.0.113.9", "private_address": "10.42.0.9",
        "ssh_port": 22, "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6cRZlMx0", "gpu_count": 0, "gpu_model": None,
        "cpus": 16, "data_disks": [{"device": "/dev/xvdf", "size_gb": 2000}], "hourly_price_usd": 1.467}
OUTPUTS = {"inventory": {"schema_version": 1, "cluster": "imagenet", "cloud": "aws", "ssh_user": "ubuntu",
                         "ssh_private_key": "/home/op/.ssh/id_ed25519", "nodes": [NODE],
                         "storage": {"server": "storage", "export": "/data", "mount_point": "/data"},
                         "network": {"name": "vpc-1", "cidr": "10.42.0.0/16"}},
           "hourly_cost_usd": {"compute": 0.0, "storage": 1.467, "total": 1.467}}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))


def test_saved_stack_output_file_is_validated_and_cached_with_host_keys(tmp_path):
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(OUTPUTS))
    inv = inventory.resolve(str(path))
    assert inv.cluster == "imagenet" and inv.storage_node.private_address.compressed == "10.42.0.9"
    assert inventory.load("imagenet") == inv.model_copy(update={"updated_at": inventory.load("imagenet").updated_at})
    assert "203.0.113.9 ssh-ed25519" in inventory.known_hosts_path("imagenet").read_text()


def test_a_plain_inventory_file_works_too(tmp_path):
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(OUTPUTS["inventory"]))
    assert inventory.resolve(str(path)).cloud == "aws"


def test_bad_stack_output_names_the_field(tmp_path):
    broken = json.loads(json.dumps(OUTPUTS))
    broken["inventory"]["nodes"][0]["role"] = "boss"
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(TrainrigError, match=r"nodes\.0\.role: Input should be 'gpu' or 'storage'"):
        inventory.resolve(str(path))


def test_the_selected_stack_through_the_pulumi_cli(tmp_path, monkeypatch):
    # A stand-in `pulumi` that answers `pulumi stack output --json` (the real CLI is not installable here).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pulumi"
    fake.write_text(f"#!/bin/sh\n[ \"$*\" = 'stack output --json --stack prod' ] || exit 3\ncat <<'EOF'\n{json.dumps(OUTPUTS)}\nEOF\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert inventory.for_task(None, "dev", "stack:prod").cluster == "imagenet"
    with pytest.raises(TrainrigError, match="not 'other'"):
        inventory.for_task("other", "dev", "stack:prod")


def test_stack_output_without_inventory():
    with pytest.raises(TrainrigError, match="has no 'inventory'; run: pulumi up"):
        inventory.from_stack_output("{}", "of stack x")
