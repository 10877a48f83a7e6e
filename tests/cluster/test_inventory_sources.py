"""Inventories from a Pulumi stack's outputs or a saved file, validated, and cached with their pinned host keys."""

from __future__ import annotations

import json

import pytest

from infra import inventory
from infra.errors import TrainrigError
from tests.helpers import KEY

NODE = {
    "name": "storage",
    "role": "storage",
    "public_address": "203.0.113.9",
    "private_address": "10.42.0.9",
    "ssh_port": 22,
    "host_key": KEY,
    "gpu_count": 0,
    "gpu_model": None,
    "cpus": 16,
    "data_disks": [{"device": "/dev/xvdf", "size_gb": 2000}],
    "hourly_price_usd": 1.467,
}
OUTPUTS = {
    "inventory": {
        "schema_version": 1,
        "cluster": "imagenet",
        "cloud": "aws",
        "ssh_user": "ubuntu",
        "ssh_private_key": "/home/op/.ssh/id_ed25519",
        "nodes": [NODE],
        "storage": {"server": "storage", "export": "/data", "mount_point": "/data"},
        "network": {"name": "vpc-1", "cidr": "10.42.0.0/16"},
    },
    "hourly_cost_usd": {"compute": 0.0, "storage": 1.467, "total": 1.467},
}


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


def test_a_named_stack_through_pulumi_automation(fake_pulumi):
    fake = fake_pulumi(OUTPUTS, {"trainrig:cloud": "aws"})
    assert inventory.for_task(None, "dev", "stack:prod").cluster == "imagenet"
    assert ["stack", "select", "--stack", "prod"] in fake.calls()
    assert any(call[:2] == ["stack", "output"] and "prod" in call for call in fake.calls())
    with pytest.raises(TrainrigError, match="not 'other'"):
        inventory.for_task("other", "dev", "stack:prod")


def test_a_stack_is_never_whichever_is_selected(fake_pulumi):
    fake = fake_pulumi(OUTPUTS, {})
    with pytest.raises(TrainrigError, match=r"needs a Pulumi stack: pass --stack NAME or set trainrig.stack"):
        inventory.for_task(None, "dev", "stack")
    assert fake.calls() == []
    # trainrig.stack names it: `pulumi up` then `fab provision` needs no extra step.
    assert inventory.for_task(None, "dev", None, stack="prod").cluster == "imagenet"


def test_a_stack_the_cli_refuses_is_one_line(fake_pulumi):
    fake_pulumi(OUTPUTS, {}).failing("stack select")
    with pytest.raises(
        TrainrigError, match=r"^Pulumi stack 'prod': error: stack select refused by the stand-in cloud$"
    ):
        inventory.for_task(None, "dev", "stack:prod")


def test_stack_output_without_inventory():
    with pytest.raises(TrainrigError, match="has no 'inventory'; run: pulumi up"):
        inventory.from_stack_output("{}", "of stack x")
