"""Dollars so far from prices and node uptimes, per cluster and per run; the ledger; regional and parked prices."""

import json
import time
from datetime import UTC, datetime

import pytest

from cluster import cost, lifecycle, runs
from infra import catalog, clouds, config, inventory, keys, state
from infra.blueprint import blueprint
from tests.infra.conftest import STACKS


def priced(cluster, gpu_usd=2.0, storage_usd=0.5):
    nodes = [
        n.model_copy(
            update={
                "hourly_price_usd": gpu_usd if n.role == "gpu" else storage_usd,
                "parked_hourly_price_usd": 0.25 if n.role == "gpu" else None,
            }
        )
        for n in cluster.inv.nodes
    ]
    return cluster.inv.model_copy(update={"nodes": nodes})


def test_a_cluster_bill_is_price_times_each_nodes_uptime_with_storage_apart(ssh_cluster):
    cluster = ssh_cluster(2)
    cluster.add_program("ps", 'test "$*" = "-o etimes= -p 1" && echo 7200')  # every node up 2 hours
    inv = priced(cluster)
    started = time.time() - 1800
    record = runs.RunRecord(
        id="r1",
        job="dp",
        node="node0",
        run_dir=str(cluster.share / "r1"),
        ranks=2,
        max_steps=None,
        started_at=datetime.now(UTC),
        nodes=["node0", "node1"],
    )
    (cluster.share / "r1").mkdir()
    status = {"state": "succeeded", "started_at": started, "ended_at": started + 900}
    (cluster.share / "r1" / "status.json").write_text(json.dumps(status))
    state.write_atomic(runs.records_path(inv.cluster), runs._records.dump_json([record]).decode())

    bill = cost.bill(inv)
    assert bill.hours_up == pytest.approx(2.0)
    assert bill.compute_usd == pytest.approx(2 * 2.0 * 2.0)
    assert bill.storage_usd == pytest.approx(0.5 * 2.0)
    assert [(n.name, n.state, n.parked_usd_per_hour) for n in bill.nodes] == [
        ("node0", "up", 0.25),
        ("node1", "up", 0.25),
        ("storage", "up", None),
    ]
    # The run: its 2 nodes x 15 minutes x $2/h.
    assert bill.runs == [("r1", "succeeded", pytest.approx(0.25), pytest.approx(1.0))]


def test_a_node_that_does_not_answer_counts_no_hours(ssh_cluster):
    cluster = ssh_cluster(1)
    cluster.add_program("ps", "echo 3600")
    inv = priced(cluster)
    cluster.servers["node0"].stop()
    bill = cost.bill(inv, with_runs=False)
    assert [(n.name, n.state) for n in bill.nodes] == [("node0", "unreachable"), ("storage", "up")]
    assert bill.compute_usd == 0 and bill.storage_usd == pytest.approx(0.5)


def test_down_writes_the_bill_to_the_ledger(ssh_cluster, monkeypatch):
    cluster = ssh_cluster(1)
    cluster.add_program("ps", "echo 36000")
    inv = priced(cluster)
    inventory.save(inv)
    keys.ensure_login_key(state.cluster_dir(inv.cluster) / "id_ed25519", inv.cluster)

    class Gone:
        def destroy(self, inv, purge):
            return None

    monkeypatch.setattr(clouds.get("local"), "backend", lambda stack=None: Gone())
    lifecycle.down(inv, purge=True)
    lifecycle.down(inv, purge=True)  # a second cluster's worth: the ledger only grows
    entries = cost.ledger()
    assert len(entries) == 2
    assert entries[0]["cluster"] == inv.cluster and entries[0]["purge"] is True
    assert entries[0]["hours_up"] == pytest.approx(10.0)
    assert entries[0]["compute_usd"] == pytest.approx(20.0) and entries[0]["storage_usd"] == pytest.approx(5.0)
    assert "total $50.00" in str(cost.ledger_table(entries).caption)


def test_regional_prices_and_root_volumes():
    aws = catalog.load("aws")
    assert aws.machine_usd_per_hour("p3.2xlarge") == aws.machines["p3.2xlarge"].usd_per_hour
    assert aws.machine_usd_per_hour("p3.2xlarge", "eu-west-1") > aws.machine_usd_per_hour("p3.2xlarge", "us-east-1")
    assert aws.machine_usd_per_hour("p3.2xlarge", "us-west-2") == aws.machines["p3.2xlarge"].usd_per_hour
    assert aws.root_disk_gb > 0 and aws.can_park and catalog.load("ibm").can_park  # IBM parks by a flavor change
    on_demand = blueprint(config.load_stack_file(next(p for p in STACKS if "aws-16-gpu" in p.name))).nodes[0]
    # The data disk and the root volume bill apart from the machine, and go on billing when parked.
    assert on_demand.disk_usd_per_hour == pytest.approx(
        aws.disk_usd_per_hour(on_demand.data_disk_gb + aws.root_disk_gb)
    )
    assert on_demand.parked_usd_per_hour == pytest.approx(on_demand.disk_usd_per_hour)
    assert not on_demand.spot
    spot = blueprint(config.load_stack_file(next(p for p in STACKS if "aws-4-gpu-efs" in p.name))).nodes[0]
    assert spot.spot and spot.parked_usd_per_hour is None, "a spot instance cannot be stopped"
    assert spot.machine_usd_per_hour == aws.machines["g5.12xlarge"].usd_per_hour  # on-demand: the most it costs


def test_spot_prices_are_shown_as_at_most(ssh_cluster):
    from rich.console import Console

    cluster = ssh_cluster(1)
    cluster.add_program("ps", "echo 3600")
    inv = priced(cluster)
    inv = inv.model_copy(update={"nodes": [n.model_copy(update={"spot": n.role == "gpu"}) for n in inv.nodes]})
    console = Console(width=200, record=True)
    console.print(cost.bill_table(cost.bill(inv, with_runs=False)))
    rows = {line.split()[0]: line for line in console.export_text().splitlines() if line.strip()}
    assert "≤ 2.00" in rows["node0"] and "≤" not in rows["storage"]
