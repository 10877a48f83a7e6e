"""`fab park` / `fab up` on IBM Cloud classic: GPU servers change flavor in place (softlayer SDK's test transport)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import SoftLayer
import yaml
from SoftLayer.testing import MockableTransport

from infra import blueprint, config
from infra.clouds import ibm
from infra.config import ConfigError
from infra.errors import TrainrigError
from tests.helpers import make_inventory

IBM = ibm.CLOUD
PRESETS = {"AC1_8X60X100": 901, "B1_2X4X100": 902}
SIZES = {"AC1_8X60X100": (8, 60 * 1024), "B1_2X4X100": (2, 4 * 1024)}  # maxCpu, maxMemory (MB)


class Servers:
    """Guests 101 and 102 whose flavor follows the upgrade orders placed: a transaction runs after each
    order (one busy look), then the guest is ready with the flavor the order named."""

    def __init__(self, transport, refuse: int | None = None, flavor: str = "AC1_8X60X100"):
        self.transport = transport
        self.flavor = {101: flavor, 102: flavor}
        self.busy: dict[int, int] = {}
        self.refuse = refuse  # a guest id whose order IBM refuses
        transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = self.guest
        transport.set_mock("SoftLayer_Product_Order", "placeOrder").side_effect = self.order
        transport.set_mock("SoftLayer_Product_Package", "getAllObjects").side_effect = lambda call: [{"id": 46}]
        transport.set_mock("SoftLayer_Product_Package", "getAccountRestrictedActivePresets").return_value = []
        transport.set_mock("SoftLayer_Product_Package", "getActivePresets").side_effect = self.presets

    def presets(self, call):
        wanted = call.filter["activePresets"]["keyName"]["operation"].removeprefix("_= ")
        return [{"id": PRESETS[wanted], "keyName": wanted}] if wanted in PRESETS else []

    def order(self, call):
        order = call.args[0]
        (guest,) = order["virtualGuests"]
        if guest["id"] == self.refuse:
            raise SoftLayer.SoftLayerAPIError("SoftLayer_Exception_Public", "This upgrade is not available.")
        assert order["complexType"] == "SoftLayer_Container_Product_Order_Virtual_Guest_Upgrade"
        self.flavor[guest["id"]] = next(k for k, v in PRESETS.items() if v == order["presetId"])
        self.busy[guest["id"]] = 1
        return {"orderId": 1}

    def guest(self, call):
        ident = call.identifier
        base = {
            "id": ident,
            "hostname": f"node{ident - 101}",
            "provisionDate": "2026-12-04T10:00:00",
            "primaryIpAddress": f"169.45.0.{ident - 100}",
            "primaryBackendIpAddress": f"10.9.0.{ident - 90}",
            "billingItem": {"id": 1, "package": {"keyName": "PUBLIC_CLOUD_SERVER"}},
            "lastTransaction": {"id": 5},
            "maxCpu": SIZES[self.flavor[ident]][0],
            "maxMemory": SIZES[self.flavor[ident]][1],
        }
        if self.busy.get(ident):
            self.busy[ident] -= 1
            return {**base, "activeTransaction": {"id": 7}, "lastTransaction": {"id": 7}}
        return base


@pytest.fixture
def transport():
    return MockableTransport(SoftLayer.FixtureTransport())


def inventory():
    inv = make_inventory(cluster="nmt")
    nodes = [
        n.model_copy(update={"cloud_id": str(101 + i), "flavor": "AC1_8X60X100"}) if n.role == "gpu" else n
        for i, n in enumerate(inv.nodes)
    ]
    return inv.model_copy(update={"cloud": "ibm", "nodes": nodes})


CFG = SimpleNamespace(park_machine="B1_2X4X100", stack_credentials=None)


def orders(transport):
    return [
        (c.args[0]["virtualGuests"][0]["id"], c.args[0]["presetId"])
        for c in transport.calls
        if c.method == "placeOrder"
    ]


def test_park_changes_each_gpu_server_to_the_park_flavor_and_resume_restores_the_inventorys(transport):
    servers = Servers(transport)
    inv = inventory()
    assert IBM.power(inv, CFG, False, transport=transport, timeout=5, interval=0.01) == {}
    assert sorted(orders(transport)) == [(101, 902), (102, 902)]
    assert servers.flavor == {101: "B1_2X4X100", 102: "B1_2X4X100"} and not any(servers.busy.values())
    # The inventory keeps the flavor each server was ordered as: resume goes back to it.
    assert [n.flavor for n in inv.gpu_nodes] == ["AC1_8X60X100", "AC1_8X60X100"]
    started = IBM.power(inv, CFG, True, transport=transport, timeout=5, interval=0.01)
    assert sorted(orders(transport)[2:]) == [(101, 901), (102, 901)]
    assert servers.flavor == {101: "AC1_8X60X100", 102: "AC1_8X60X100"}
    assert started == {"node0": "169.45.0.1", "node1": "169.45.0.2"}


def test_a_refused_park_changes_the_servers_already_parked_back(transport):
    servers = Servers(transport, refuse=102)
    with pytest.raises(TrainrigError) as exc:
        IBM.power(inventory(), CFG, False, transport=transport, timeout=5, interval=0.01)
    assert str(exc.value) == (
        "IBM Cloud classic refused to change server node1 (id 102) to flavor B1_2X4X100: This upgrade is not "
        "available. (SoftLayer_Exception_Public); node0 changed back to their GPU flavor, nothing is parked"
    )
    placed = orders(transport)
    assert sorted(placed[:2]) == [(101, 902), (102, 902)] and placed[2:] == [(101, 901)]  # 102 refused, 101 back
    assert servers.flavor == {101: "AC1_8X60X100", 102: "AC1_8X60X100"}


def test_a_resume_that_went_half_way_orders_only_what_is_still_parked(transport):
    servers = Servers(transport, flavor="B1_2X4X100", refuse=102)
    with pytest.raises(TrainrigError, match=r"This upgrade is not available.*; run fab up --name nmt again$"):
        IBM.power(inventory(), CFG, True, transport=transport, timeout=5, interval=0.01)
    assert servers.flavor == {101: "AC1_8X60X100", 102: "B1_2X4X100"}
    servers.refuse = None
    started = IBM.power(inventory(), CFG, True, transport=transport, timeout=5, interval=0.01)
    assert sorted(orders(transport)) == [(101, 901), (102, 901), (102, 901)]  # 101 was back: no second order
    assert servers.flavor == {101: "AC1_8X60X100", 102: "AC1_8X60X100"} and set(started) == {"node0", "node1"}


def test_a_park_flavor_ibm_does_not_offer_is_refused_in_one_line(transport):
    Servers(transport)
    cfg = SimpleNamespace(park_machine="B1_1X2X100", stack_credentials=None)
    with pytest.raises(TrainrigError, match=r"^IBM Cloud classic refused to change server node0 \(id 101\) to flavor "):
        IBM.power(inventory(), cfg, False, transport=transport, timeout=5, interval=0.01)
    assert not orders(transport)


def test_an_inventory_without_server_ids_or_flavors_is_refused_before_any_order(transport):
    inv = inventory()
    old = inv.model_copy(update={"nodes": [n.model_copy(update={"flavor": None}) for n in inv.nodes]})
    with pytest.raises(TrainrigError, match=r"holds no IBM server id or flavor for node0, node1: run pulumi up"):
        IBM.power(old, CFG, False, transport=transport)
    assert not [c for c in transport.calls if c.method == "placeOrder"]


def ibm_config(**extra):
    sample = yaml.safe_load((config.ROOT / "stacks" / "Pulumi.ibm-dal10-v100.yaml").read_text())["config"]
    return config.from_pulumi_config({**sample, **extra})


def test_the_parked_price_is_the_park_flavor_and_the_disks():
    cfg = ibm_config()
    assert cfg.park_machine == "B1_2X4X100"
    node = blueprint.blueprint(cfg).node("node0")
    assert node.parked_usd_per_hour == pytest.approx(0.070 + node.disk_usd_per_hour)
    assert node.parked_machine_usd_per_hour == 0.070 and node.machine_usd_per_hour == 2.46


@pytest.mark.parametrize(
    ("flavor", "error"),
    [
        ("AC2_8X60X25", "park_flavor: AC2_8X60X25 is not a CPU flavor in infra/clouds/ibm/prices.yaml"),
        ("B1_2X4X25", "park_flavor: B1_2X4X25 has a 25 GB first disk, AC2_8X60X100 one of 100 GB"),
        ("B9_NOPE", "park_flavor: B9_NOPE is not a CPU flavor"),
    ],
)
def test_a_park_flavor_that_cannot_take_the_boot_disk_is_refused(flavor, error):
    with pytest.raises(ConfigError, match=error):
        ibm_config(**{"trainrig:park_flavor": flavor})


def test_the_switch_cannot_park_ibm_servers():
    with pytest.raises(ConfigError, match="on_idle: the dead-man switch cannot park ibm GPU nodes"):
        ibm_config(**{"trainrig:on_idle": "park"})
    with pytest.raises(TrainrigError, match="the dead-man switch cannot park 'nmt''s IBM servers"):
        IBM.switch_cancel(inventory().model_copy(update={"on_idle": "park"}), {})
