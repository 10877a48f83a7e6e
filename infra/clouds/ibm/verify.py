"""`fab plan --verify` for IBM Cloud classic: ask the API whether each server's order would be accepted.

Per kind of server (the GPU nodes share one order, the storage node has its own): the template
generateOrderTemplate makes from the order trainrig would place, then Product_Order.verifyOrder
on it, which prices it against the datacenter's catalog (flavor, image, disks, port speed) and
bills nothing. Then the private network: the given VLAN must be in the datacenter; without one,
servers may land on different private VLANs, which reach each other only with VLAN spanning or
VRF. And the flavor `fab park` would change the GPU servers to must be one the virtual server
package offers. What no API answers before the order: whether capacity is there at that moment.
"""

from __future__ import annotations

import SoftLayer
from SoftLayer import utils as sl_utils

from infra.blueprint import Blueprint
from infra.clouds import Findings
from infra.clouds.ibm import IbmConfig
from infra.clouds.ibm.program import order_props
from infra.clouds.ibm.softlayer import IbmError, VirtualServerProvider, create_order


def verify(cfg: IbmConfig, bp: Blueprint, transport=None) -> Findings:
    found = Findings()
    provider = VirtualServerProvider(transport=transport)
    provider._stack_credentials = cfg.stack_credentials
    client = provider.client()
    vs = SoftLayer.VSManager(client)
    groups: dict[str, list[str]] = {}
    for node in bp.nodes:
        groups.setdefault(node.role, []).append(node.name)
    guids: dict[str, str | None] = {}  # each role's private image (trainrig:image, trainrig:storage_image)
    for role, names in groups.items():
        image_id = order_props(cfg, bp.node(names[0]))["image_id"]
        try:
            guids[role] = provider._global_identifier(int(image_id)) if str(image_id).isdigit() else image_id
        except IbmError as exc:
            found.problems.append(str(exc))
            return found
    for role, names in groups.items():
        planned = bp.node(names[0])
        who = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        order = create_order(vs, order_props(cfg, planned), guids[role])
        try:
            template = vs.guest.generateOrderTemplate(order)
            client.call("SoftLayer_Product_Order", "verifyOrder", template)
        except SoftLayer.SoftLayerAPIError as exc:
            found.problems.append(
                f"{who} ({planned.flavor} in {cfg.datacenter}): IBM Cloud classic would refuse the order: "
                f"{exc.faultString} ({exc.faultCode})"
            )
    _vlans(client, cfg, len(bp.nodes), found)
    _park_flavor(client, cfg, found)
    return found


def _park_flavor(client: SoftLayer.BaseClient, cfg: IbmConfig, found: Findings) -> None:
    try:
        SoftLayer.OrderingManager(client).get_preset_by_key("PUBLIC_CLOUD_SERVER", cfg.park_machine, mask="id,keyName")
    except SoftLayer.SoftLayerAPIError as exc:
        found.notes.append(f"the park flavor could not be checked: {exc.faultString} ({exc.faultCode})")
    except SoftLayer.SoftLayerError:
        found.problems.append(
            f"park_flavor {cfg.park_machine}: IBM Cloud classic offers no such flavor, so fab park would be refused; "
            "set trainrig:park_flavor to a CPU flavor from: ibmcloud sl vs options"
        )


def _vlans(client: SoftLayer.BaseClient, cfg: IbmConfig, servers: int, found: Findings) -> None:
    try:
        if cfg.private_vlan is not None:
            vlan = client.call(
                "SoftLayer_Network_Vlan",
                "getObject",
                id=cfg.private_vlan,
                mask="mask[id,vlanNumber,networkSpace,primaryRouter[datacenter[name]]]",
            )
            where = sl_utils.lookup(vlan, "primaryRouter", "datacenter", "name")
            if where != cfg.datacenter:
                found.problems.append(
                    f"private_vlan {cfg.private_vlan} is in {where}, not {cfg.datacenter}; "
                    f"pick one from: ibmcloud sl vlan list -d {cfg.datacenter}"
                )
            elif str(vlan.get("networkSpace", "PRIVATE")).upper() != "PRIVATE":
                found.problems.append(f"private_vlan {cfg.private_vlan} is a public VLAN; pick a private one")
            return
        if servers > 1:
            span = client.call("SoftLayer_Account", "getNetworkVlanSpan")
            if not (span or {}).get("enabledFlag"):
                found.problems.append(
                    "VLAN spanning is off for this account and trainrig:private_vlan is not set: the servers may "
                    "land on different private VLANs and not reach each other (NFS, MPI); set trainrig:private_vlan "
                    f"(ibmcloud sl vlan list -d {cfg.datacenter}), or turn on VLAN spanning or VRF"
                )
    except SoftLayer.SoftLayerAPIError as exc:
        found.notes.append(f"the private VLANs could not be checked: {exc.faultString} ({exc.faultCode})")
