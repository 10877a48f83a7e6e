"""The IBM Cloud classic dynamic provider against the softlayer SDK's own test transport (fixtures + mocks)."""

from __future__ import annotations

import pickle

import dill
import pytest
import SoftLayer
from pulumi.dynamic import ConfigureRequest
from pulumi.dynamic.config import Config
from pulumi.dynamic.dynamic import serialize_provider
from SoftLayer.testing import MockableTransport

from infra.clouds.ibm.softlayer import IbmError, SshKeyProvider, VirtualServerProvider

READY = {
    "id": 100,
    "provisionDate": "2025-06-01T10:00:00",
    "primaryIpAddress": "169.45.0.7",
    "primaryBackendIpAddress": "10.45.19.37",
    "hostname": "node0",
    "billingItem": {"id": 6327},
}
NOT_READY = {"id": 100, "activeTransaction": {"id": 1}, "billingItem": {"id": 6327}}
GONE = SoftLayer.SoftLayerAPIError("SoftLayer_Exception_ObjectNotFound", "Unable to find object with id of '100'.")
SIZES = {"AC2_8X60X100": (8, 60), "AC2_16X120X100": (16, 120), "B1_2X8X100": (2, 8)}
PROPS = {
    "hostname": "node0",
    "domain": "nmt.example.com",
    "datacenter": "syd04",
    "flavor": "AC2_8X60X100",
    "os_code": "UBUNTU_22_64",
    "image_id": None,
    "hourly": True,
    "local_disk": False,
    "disks": [2000],
    "nic_speed": 1000.0,  # Pulumi hands numbers back to a dynamic provider as floats
    "ssh_key_ids": [1234],
    "private_vlan": None,
    "tags": ["trainrig-cluster:nmt"],
    "user_data": "#cloud-config\n",
}


@pytest.fixture
def transport():
    return MockableTransport(SoftLayer.FixtureTransport())


def provider(transport, **kw):
    return VirtualServerProvider(
        ready_timeout_s=kw.pop("timeout", 2), poll_interval_s=0.01, flavor_sizes=SIZES, transport=transport
    )


def calls(transport, method):
    return [c for c in transport.calls if c.method == method]


def test_create_orders_what_the_seed_ordered_and_waits_until_ready(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = [NOT_READY, NOT_READY, READY]
    result = provider(transport).create(dict(PROPS))
    assert result.id == "100"
    assert result.outs["public_ip"] == "169.45.0.7" and result.outs["private_ip"] == "10.45.19.37"
    order = calls(transport, "createObject")[0].args[0]
    assert order["datacenter"] == {"name": "syd04"} and order["hourlyBillingFlag"] is True
    assert order["supplementalCreateObjectOptions"]["flavorKeyName"] == "AC2_8X60X100"
    assert order["operatingSystemReferenceCode"] == "UBUNTU_22_64" and order["localDiskFlag"] is False
    # The flavor brings the boot disk: only the data disk goes out, as device 2.
    assert order["blockDevices"] == [{"device": "2", "diskImage": {"capacity": 2000}}]
    assert order["networkComponents"] == [{"maxSpeed": 1000}] and order["sshKeys"] == [{"id": 1234}]
    assert type(order["networkComponents"][0]["maxSpeed"]) is int, "a float speed is not a port speed"
    # Checked by the API before it is placed.
    names = [c.method for c in transport.calls if c.method in ("generateOrderTemplate", "createObject")]
    assert names == ["generateOrderTemplate", "createObject"]
    assert calls(transport, "generateOrderTemplate")[0].args[0] == order
    assert order["userData"] == [{"value": "#cloud-config\n"}]
    assert calls(transport, "setTags")[0].args[0] == "trainrig-cluster:nmt"
    assert len(calls(transport, "getObject")) == 3


@pytest.mark.parametrize(
    "image, guid",
    [
        ("100", "0B5DEAF4-643D-46CA-A695-CECBE8832C9D"),  # the number the portal shows: looked up
        ("EB38414C-2AB3-47F3-BBBD-56A5F689620B", "EB38414C-2AB3-47F3-BBBD-56A5F689620B"),  # a GUID: as given
    ],
)
def test_an_image_orders_by_its_global_identifier(transport, image, guid):
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").return_value = READY
    provider(transport).create({**PROPS, "os_code": None, "image_id": image, "disks": []})
    order = calls(transport, "createObject")[0].args[0]
    assert order["blockDeviceTemplateGroup"] == {"globalIdentifier": guid}
    assert "operatingSystemReferenceCode" not in order
    assert "blockDevices" not in order, "the API refuses block devices with an image template"


def test_an_image_not_in_the_account_is_one_line_and_nothing_ordered(transport):
    transport.set_mock(
        "SoftLayer_Virtual_Guest_Block_Device_Template_Group", "getObject"
    ).side_effect = SoftLayer.SoftLayerAPIError(
        "SoftLayer_Exception_ObjectNotFound", "Unable to find object with id of '42'."
    )
    with pytest.raises(IbmError, match=r"^image 42 is not in this account; find yours with: ibmcloud sl image list$"):
        provider(transport).create({**PROPS, "os_code": None, "image_id": "42"})
    assert not calls(transport, "createObject")


def test_rejected_order_is_one_clear_error_and_nothing_to_cancel(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "createObject").side_effect = SoftLayer.SoftLayerAPIError(
        "SoftLayer_Exception_Public", "Unable to place order: out of stock in syd04"
    )
    with pytest.raises(
        IbmError, match=r"refused to order server node0 \(AC2_8X60X100 in syd04\): Unable to place order"
    ):
        provider(transport).create(dict(PROPS))
    assert not calls(transport, "deleteObject")


def test_an_order_the_template_check_refuses_is_never_placed(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "generateOrderTemplate").side_effect = SoftLayer.SoftLayerAPIError(
        "SoftLayer_Exception_Order_InvalidLocation", "The location provided for this order is invalid."
    )
    with pytest.raises(IbmError, match=r"refused to accept the order for server node0 .*location provided"):
        provider(transport).create(dict(PROPS))
    assert not calls(transport, "createObject") and not calls(transport, "deleteObject")


def test_a_failure_after_the_order_cancels_the_server_and_names_it(transport):
    """Tagging fails once the server bills: it is cancelled, and the error says which server it was."""
    state = {"cancelled": False}
    transport.set_mock("SoftLayer_Virtual_Guest", "setTags").side_effect = SoftLayer.SoftLayerAPIError(
        "SoftLayer_Exception_InvalidValue", "Tag is not valid"
    )

    def delete_object(call):
        state["cancelled"] = True
        return True

    transport.set_mock("SoftLayer_Virtual_Guest", "deleteObject").side_effect = delete_object
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = lambda call: (
        {"id": 100} if state["cancelled"] else READY
    )
    with pytest.raises(IbmError, match=r"^server node0 \(id 100\) was ordered, then .*Tag is not valid.*cancelled$"):
        provider(transport).create(dict(PROPS))
    assert calls(transport, "deleteObject")[0].identifier == 100


def test_a_transient_error_while_waiting_is_polled_through_not_cancelled(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = [
        NOT_READY,
        SoftLayer.TransportError(0, "Connection reset by peer"),
        SoftLayer.TransportError(503, "Service Unavailable"),
        READY,
    ]
    assert provider(transport).create(dict(PROPS)).id == "100"
    assert not calls(transport, "deleteObject")


def test_a_refusal_while_waiting_still_cancels(transport):
    state = {"cancelled": False}

    def get_object(call):
        if state["cancelled"]:
            raise GONE
        raise SoftLayer.SoftLayerAPIError("SoftLayer_Exception_PermissionDenied", "no access")

    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = get_object
    transport.set_mock("SoftLayer_Virtual_Guest", "deleteObject").side_effect = lambda call: (
        state.update(cancelled=True) or True
    )
    with pytest.raises(IbmError, match=r"server node0 \(id 100\) was ordered, then .*no access.*cancelled"):
        provider(transport).create(dict(PROPS))


def test_more_than_five_disks_is_refused_before_any_order(transport):
    with pytest.raises(IbmError, match=r"6 disks asked, a classic virtual server has at most 5"):
        provider(transport).create({**PROPS, "disks": [100] * 5})
    assert not calls(transport, "createObject")


DISK_CATEGORIES = [
    {"id": 82, "name": "Second Disk"},
    {"id": 92, "name": "Third Disk"},
    {"id": 93, "name": "Fourth Disk"},
    {"id": 116, "name": "Fifth Disk"},
]


class Guest:
    """A guest whose state follows the upgrade orders placed: a transaction runs after each, then it is ready."""

    def __init__(self, transport, disks=("guest_disk0", "guest_disk1"), idle_polls=1, busy_polls=2):
        self.transport, self.disks = transport, list(disks)
        self.idle_polls, self.busy_polls, self.seen = idle_polls, busy_polls, 0
        transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = self
        transport.set_mock("SoftLayer_Product_Package", "getItemPrices").return_value = [
            {"id": 1, "categories": DISK_CATEGORIES}
        ]

    def __call__(self, call):
        base = {
            **READY,
            "billingItem": {
                "id": 1,
                "package": {"keyName": "PUBLIC_CLOUD_SERVER"},
                "children": [{"categoryCode": c} for c in self.disks],
            },
            "lastTransaction": {"id": 5},
        }
        if not calls(self.transport, "placeOrder"):
            return base
        self.seen += 1
        if self.seen <= self.idle_polls:  # the order is in, IBM has not started it yet
            return base
        if self.seen <= self.idle_polls + self.busy_polls:
            return {**base, "activeTransaction": {"id": 7}, "lastTransaction": {"id": 7}}
        return {**base, "lastTransaction": {"id": 7}}


def test_a_private_image_gets_its_data_disk_by_an_upgrade_once_up(transport):
    guest = Guest(transport, disks=("guest_disk0",))
    result = provider(transport).create({**PROPS, "os_code": None, "image_id": "EB38414C", "disks": [10]})
    assert "blockDevices" not in calls(transport, "createObject")[0].args[0]
    order = calls(transport, "placeOrder")[0].args[0]
    assert order["virtualGuests"] == [{"id": 100}]
    assert [c["id"] for p in order["prices"] for c in p.get("categories", [])] == [82], "the Second Disk (xvdc)"
    assert result.id == "100" and guest.seen > guest.idle_polls + guest.busy_polls, "waited for the upgrade"
    assert not calls(transport, "deleteObject")


def test_adding_a_disk_names_the_next_disk_and_never_resizes_the_current_one(transport):
    Guest(transport)
    provider(transport).update("100", {**PROPS, "disks": [10]}, {**PROPS, "disks": [10, 10]})
    order = calls(transport, "placeOrder")[0].args[0]
    assert [c["id"] for p in order["prices"] for c in p.get("categories", [])] == [92], "the Third Disk, a new one"


def test_adding_a_disk_where_one_exists_orders_nothing(transport):
    Guest(transport, disks=("guest_disk0", "guest_disk1", "guest_disk2"))
    with pytest.raises(IbmError, match=r"already has a disk in guest_disk2; adding one there would resize it"):
        provider(transport).update("100", {**PROPS, "disks": [10]}, {**PROPS, "disks": [10, 10]})
    assert not calls(transport, "placeOrder")


def test_an_upgrade_waits_for_its_transaction_to_start_and_to_finish(transport):
    guest = Guest(transport, idle_polls=2, busy_polls=3)
    provider(transport).update("100", {**PROPS, "nic_speed": 100}, dict(PROPS))
    assert guest.seen == 2 + 3 + 1, "returned before the resize had happened"
    order = calls(transport, "placeOrder")[0].args[0]
    assert order["virtualGuests"] == [{"id": 100}] and order["prices"]


def test_never_ready_within_the_deadline_cancels_and_confirms_gone(transport):
    state = {"cancelled": False}

    def get_object(call):
        if state["cancelled"]:
            raise GONE
        return NOT_READY

    def delete_object(call):
        state["cancelled"] = True
        return True

    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = get_object
    transport.set_mock("SoftLayer_Virtual_Guest", "deleteObject").side_effect = delete_object
    with pytest.raises(IbmError, match=r"node0 \(id 100\) was not ready within 0s; the order was cancelled"):
        provider(transport, timeout=0.05).create(dict(PROPS))
    assert calls(transport, "deleteObject")[0].identifier == 100


def test_read_returns_addresses_and_notices_a_server_that_is_gone(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").return_value = READY
    assert provider(transport).read("100", dict(PROPS)).outs["private_ip"] == "10.45.19.37"
    assert "billingItem[id]" in calls(transport, "getObject")[-1].mask
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = GONE
    assert provider(transport).read("100", dict(PROPS)).id is None


def test_read_counts_a_cancelled_server_not_yet_reclaimed_as_gone(transport):
    # What the dead-man switch leaves: the guest still listed a while, its billing item gone.
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").return_value = {**READY, "billingItem": None}
    assert provider(transport).read("100", dict(PROPS)).id is None


@pytest.mark.parametrize(
    "change, replaces",
    [
        ({"flavor": "AC2_16X120X100"}, []),  # bigger flavor: in-place upgrade
        ({"disks": [2000, 2000]}, []),  # added disk: in-place upgrade
        ({"nic_speed": 10000}, []),
        ({"tags": ["a:b"]}, []),
        ({"flavor": "B1_2X8X100"}, ["flavor"]),  # smaller flavor: a new server
        ({"disks": []}, ["disks"]),  # removed disk
        ({"datacenter": "dal10"}, ["datacenter"]),
        ({"os_code": "UBUNTU_20_64"}, ["os_code"]),
        # Read at first boot only: a changed admin_cidr never replaces a server (provisioning applies it).
        ({"user_data": "#cloud-config\nx: 1\n"}, []),
        ({"hostname": "node9"}, ["hostname"]),
    ],
)
def test_diff_tells_upgrades_from_replacements(change, replaces):
    diff = VirtualServerProvider(flavor_sizes=SIZES).diff("100", {**PROPS, "public_ip": "1.2.3.4"}, {**PROPS, **change})
    assert diff.changes is True and diff.replaces == replaces


def test_no_change_is_no_diff():
    assert VirtualServerProvider(flavor_sizes=SIZES).diff("100", dict(PROPS), dict(PROPS)).changes is False


def test_update_upgrades_flavor_and_adds_a_disk_through_the_sdk(transport, monkeypatch):
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").return_value = {
        **READY,
        "billingItem": {"id": 1, "package": {"keyName": "PUBLIC_CLOUD_SERVER"}, "children": []},
    }
    upgrades = []
    monkeypatch.setattr(
        VirtualServerProvider,
        "_upgrade",
        lambda self, vs, guest_id, name, **kw: upgrades.append((guest_id, kw)) or READY,
    )
    result = provider(transport).update("100", dict(PROPS), {**PROPS, "flavor": "AC2_16X120X100", "disks": [2000, 500]})
    assert upgrades == [
        (100, {"preset": "AC2_16X120X100", "nic_speed": None, "disks": [{"capacity": 500, "number": 3}]})
    ]
    assert result.outs["flavor"] == "AC2_16X120X100"


def test_delete_cancels_and_waits_until_gone(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").side_effect = [READY, {"id": 100}]
    provider(transport).delete("100", dict(PROPS))
    assert calls(transport, "deleteObject")[0].identifier == 100
    assert len(calls(transport, "getObject")) == 2


def test_delete_of_a_server_already_gone_is_fine(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "deleteObject").side_effect = GONE
    provider(transport).delete("100", dict(PROPS))


def test_ssh_key_create_and_delete(transport):
    keys = SshKeyProvider(transport=transport)
    created = keys.create({"key": "ssh-ed25519 AAAA op@laptop", "label": "trainrig-nmt", "key_id": None})
    assert created.id == "1234" and created.outs["key_id"] == 1234
    keys.delete("1234", {})
    assert calls(transport, "deleteObject")[0].identifier == 1234


def test_missing_credentials_is_one_line_naming_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("SL_USERNAME", raising=False)
    monkeypatch.delenv("SL_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(IbmError, match="SL_USERNAME/SL_API_KEY: IBM Cloud classic credentials are missing; export"):
        VirtualServerProvider().create(dict(PROPS))


def test_round_trip_through_pulumis_pickling_keeps_no_credentials(monkeypatch):
    secret = "sl-api-key-that-must-not-be-pickled"
    monkeypatch.setenv("SL_API_KEY", secret)
    original = VirtualServerProvider(ready_timeout_s=5, flavor_sizes=SIZES)
    original.configure(
        ConfigureRequest(Config({"trainrig:sl_username": "me", "trainrig:sl_api_key": secret}, "trainrig"))
    )
    assert original._stack_credentials == ("me", secret)
    serialized = serialize_provider(original)  # what Pulumi stores in state (base64 of dill)
    import base64

    raw = base64.b64decode(serialized)
    assert secret.encode() not in raw
    restored = dill.loads(raw)
    assert isinstance(restored, VirtualServerProvider)
    assert restored.ready_timeout_s == 5 and restored.flavor_sizes == SIZES
    assert restored._stack_credentials is None
    assert pickle.loads(pickle.dumps(restored)).flavor_sizes == SIZES


def test_audit_lists_tagged_servers_and_their_san_disks_and_nothing_once_cancelled(transport):
    from infra.clouds.ibm import CLOUD as IBM
    from tests.helpers import make_inventory

    def guest(guest_id, hostname, cluster):
        return {
            "id": guest_id,
            "hostname": hostname,
            "datacenter": {"name": "syd04"},
            "tagReferences": [{"tag": {"name": f"trainrig-cluster:{cluster}"}}] if cluster else [],
            "blockDevices": [
                {"device": "0", "diskImage": {"capacity": 100, "units": "GB"}},
                {"device": "2", "diskImage": {"capacity": 2000, "units": "GB"}},
            ],
        }

    listing = transport.set_mock("SoftLayer_Account", "getVirtualGuests")
    listing.return_value = [
        guest(1, "storage", "nmt"),
        guest(2, "node0", "nmt"),
        guest(3, "node0", "lost"),
        guest(4, "web", None),
    ]
    known = {"nmt": make_inventory(gpu_nodes=0, cluster="nmt")}
    found = IBM.audit(known, everything=False, transport=transport)
    assert [(b.kind, b.id, b.node, b.accounted_for(known)) for b in found] == [
        ("virtual server", "1", "storage", True),
        ("san volume", "1/disk0", "storage", True),
        ("san volume", "1/disk2", "storage", True),
        ("virtual server", "2", "node0", False),
        ("san volume", "2/disk0", "node0", False),
        ("san volume", "2/disk2", "node0", False),
    ]
    assert found[2].detail == "2000 GB"
    everything = IBM.audit(known, everything=True, transport=transport)
    assert {b.cluster for b in everything} == {"nmt", "lost"}, "servers without the tag are not trainrig's"
    listing.return_value = [guest(4, "web", None)]
    assert IBM.audit(known, everything=True, transport=transport) == []


def test_bake_captures_the_boot_disk_of_the_tagged_server_and_waits_for_the_transaction(transport):
    from infra.clouds.ibm.softlayer import Listing

    transport.set_mock("SoftLayer_Account", "getVirtualGuests").return_value = [
        {"id": 7, "hostname": "node0", "billingItem": {"id": 1}}
    ]
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").return_value = {
        "id": 7,
        "blockDevices": [
            {"id": 1, "device": "0", "mountType": "Disk", "diskImage": {"id": 11, "type": {"keyName": "SYSTEM"}}},
            {"id": 2, "device": "1", "mountType": "Disk", "diskImage": {"id": 12, "type": {"keyName": "SWAP"}}},
            {"id": 3, "device": "2", "mountType": "Disk", "diskImage": {"id": 13, "type": {"keyName": "SYSTEM"}}},
        ],
    }
    transport.set_mock("SoftLayer_Virtual_Guest", "createArchiveTemplate").return_value = {"id": 900}
    transport.set_mock("SoftLayer_Virtual_Guest", "getActiveTransactions").side_effect = [[{"id": 5}], []]
    transport.set_mock("SoftLayer_Virtual_Guest_Block_Device_Template_Group", "getObject").return_value = {
        "id": 900,
        "globalIdentifier": "0a1b2c3d-guid",
    }
    assert Listing(transport).capture("nmt", "node0", "nmt-node0-1", interval=0.01) == "0a1b2c3d-guid"
    listed = calls(transport, "getVirtualGuests")[0]
    assert listed.filter["virtualGuests"]["hostname"] == {"operation": "_= node0"}
    assert listed.filter["virtualGuests"]["tagReferences"]["tag"]["name"] == {
        "operation": "in",
        "options": [{"name": "data", "value": ["trainrig-cluster:nmt"]}],
    }
    (archive,) = calls(transport, "createArchiveTemplate")
    name, disks, notes = archive.args
    assert (archive.identifier, name, notes) == (7, "trainrig-nmt-node0-1", "nmt/node0")
    assert [d["device"] for d in disks] == ["0"]  # the boot disk: the data disk stays the cluster's
    assert len(calls(transport, "getActiveTransactions")) == 2


def test_bake_of_a_server_ibm_does_not_list_is_one_line(transport):
    from infra.clouds.ibm.softlayer import Listing

    transport.set_mock("SoftLayer_Account", "getVirtualGuests").return_value = []
    with pytest.raises(IbmError, match=r"^IBM lists no server node0 of cluster nmt to bake$"):
        Listing(transport).capture("nmt", "node0", "x", interval=0.01)
    assert not calls(transport, "createArchiveTemplate")


def test_an_update_of_the_user_data_alone_orders_nothing(transport):
    transport.set_mock("SoftLayer_Virtual_Guest", "getObject").return_value = READY
    result = provider(transport).update("100", dict(PROPS), {**PROPS, "user_data": "#cloud-config\nx: 1\n"})
    assert result.outs["private_ip"] == "10.45.19.37"
    assert not [c for c in transport.calls if c.method in ("placeOrder", "createObject", "setTags", "cancelService")]
