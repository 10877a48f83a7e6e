"""Pulumi dynamic providers for IBM Cloud classic (SoftLayer): virtual servers and SSH keys, on the softlayer SDK.

Pulumi pickles a dynamic provider into the stack's state, so no credentials ever live on one:
each method builds its own client from the environment (SL_USERNAME / SL_API_KEY, or
~/.softlayer) or from the stack's secret config handed to `configure`, which is dropped on
pickling. Waits poll the API with a deadline; a server that never becomes ready is cancelled.
"""

from __future__ import annotations

import os
from typing import Any

import SoftLayer
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, ResourceProvider, UpdateResult
from SoftLayer import utils as sl_utils

from infra.clouds import Billable
from infra.commands import wait_until
from infra.errors import TrainrigError

READY_MASK = (
    "mask[id,provisionDate,activeTransaction[id],lastOperatingSystemReload[id],"
    "primaryIpAddress,primaryBackendIpAddress,hostname,domain,status]"
)
# Inputs whose change needs a new server; the rest (flavor, nic_speed, added disks, tags) are upgrades.
REPLACES = (
    "hostname",
    "domain",
    "datacenter",
    "os_code",
    "image_id",
    "hourly",
    "private_vlan",
    "ssh_key_ids",
    "user_data",
    "local_disk",
)


class IbmError(TrainrigError):
    """An IBM Cloud classic call that failed, said in one line."""


class _Credentials:
    """Where a provider's client gets its credentials: never stored in the pickled provider."""

    _stack_credentials: tuple[str, str] | None = None

    def configure(self, req) -> None:
        username, api_key = req.config.get("trainrig:sl_username"), req.config.get("trainrig:sl_api_key")
        self._stack_credentials = (username, api_key) if username and api_key else None

    def __getstate__(self) -> dict[str, Any]:
        # Pulumi pickles the provider into state: keep the credentials out of it.
        return {k: v for k, v in self.__dict__.items() if k != "_stack_credentials"}

    def client(self) -> SoftLayer.BaseClient:
        transport = getattr(self, "transport", None)
        if transport is not None:
            return SoftLayer.create_client_from_env(username="test", api_key="test", transport=transport)
        username, api_key = self._stack_credentials or (os.environ.get("SL_USERNAME"), os.environ.get("SL_API_KEY"))
        if not (username and api_key) and not os.path.isfile(os.path.expanduser("~/.softlayer")):
            raise IbmError(
                "SL_USERNAME/SL_API_KEY: IBM Cloud classic credentials are missing; export SL_USERNAME and "
                "SL_API_KEY, or: pulumi config set --secret sl_api_key KEY (and sl_username)"
            )
        return SoftLayer.create_client_from_env(username=username, api_key=api_key)


def _api_error(action: str, exc: SoftLayer.SoftLayerAPIError) -> IbmError:
    return IbmError(f"IBM Cloud classic refused to {action}: {exc.faultString} ({exc.faultCode})")


def _not_found(exc: SoftLayer.SoftLayerAPIError) -> bool:
    return "ObjectNotFound" in str(exc.faultCode) or exc.faultCode == 404


class SshKeyProvider(_Credentials, ResourceProvider):
    """An SSH public key registered on the account, so servers can be ordered with it."""

    def __init__(self, transport=None):
        super().__init__()
        self.transport = transport

    def create(self, props: dict[str, Any]) -> CreateResult:
        try:
            key = SoftLayer.SshKeyManager(self.client()).add_key(props["key"], props["label"], notes="trainrig")
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"register SSH key {props['label']}", exc) from None
        return CreateResult(str(key["id"]), {**props, "key_id": int(key["id"])})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = [k for k in ("key", "label") if olds.get(k) != news.get(k)]
        return DiffResult(changes=bool(changed), replaces=changed, delete_before_replace=False)

    def delete(self, id_: str, _props: dict[str, Any]) -> None:
        try:
            SoftLayer.SshKeyManager(self.client()).delete_key(int(id_))
        except SoftLayer.SoftLayerAPIError as exc:
            if not _not_found(exc):
                raise _api_error(f"delete SSH key {id_}", exc) from None


class VirtualServerProvider(_Credentials, ResourceProvider):
    """A classic virtual server: ordered, waited for, upgraded in place where the API allows, cancelled."""

    def __init__(self, ready_timeout_s: float = 3600, poll_interval_s: float = 15, flavor_sizes=None, transport=None):
        super().__init__()
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        # {flavor: (cpus, memory_gb)}: tells an upgrade (bigger) from a change that needs a new server.
        self.flavor_sizes = dict(flavor_sizes or {})
        self.transport = transport  # tests only: the SDK's fixture transport

    # -- create ---------------------------------------------------------------------------
    def create(self, props: dict[str, Any]) -> CreateResult:
        vs = SoftLayer.VSManager(self.client())
        name = props["hostname"]
        order = _order(props)
        if str(order.get("image_id", "")).isdigit():
            order["image_id"] = self._global_identifier(int(order["image_id"]))
        try:
            created = vs.create_instance(**order)
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"order server {name} ({props['flavor']} in {props['datacenter']})", exc) from None
        guest_id = int(created["id"])
        try:
            guest = self._wait_ready(vs, guest_id, name)
        except BaseException:
            self._cancel_and_confirm(vs, guest_id, name)
            raise
        return CreateResult(str(guest_id), _outputs(props, guest))

    def _global_identifier(self, image_id: int) -> str:
        """The portal and `ibmcloud sl image list` show an image's number; an order names its GUID."""
        try:
            image = SoftLayer.ImageManager(self.client()).get_image(image_id, mask="id,globalIdentifier")
        except SoftLayer.SoftLayerAPIError as exc:
            if _not_found(exc):
                raise IbmError(
                    f"image {image_id} is not in this account; find yours with: ibmcloud sl image list"
                ) from None
            raise _api_error(f"look up image {image_id}", exc) from None
        if not image.get("globalIdentifier"):
            raise IbmError(f"image {image_id} has no global identifier to order from; use its GUID or an OS code")
        return image["globalIdentifier"]

    def _wait_ready(self, vs: SoftLayer.VSManager, guest_id: int, name: str, pending: bool = False) -> dict:
        def ready() -> dict | None:
            guest = vs.get_instance(guest_id, mask=READY_MASK)
            return guest if sl_utils.is_ready(guest, pending) else None

        return wait_until(
            ready,
            timeout=self.ready_timeout_s,
            interval=self.poll_interval_s,
            what=f"server {name}",
            error=IbmError(
                f"server {name} (id {guest_id}) was not ready within "
                f"{self.ready_timeout_s:.0f}s; the order was cancelled"
            ),
        )

    def _cancel_and_confirm(self, vs: SoftLayer.VSManager, guest_id: int, name: str) -> None:
        try:
            vs.cancel_instance(guest_id)
        except SoftLayer.SoftLayerAPIError as exc:
            if _not_found(exc):
                return
            raise _api_error(
                f"cancel server {name} (id {guest_id}); cancel it by hand: ibmcloud sl vs cancel {guest_id}", exc
            ) from None
        wait_until(
            lambda: not self._exists(vs, guest_id),
            timeout=self.ready_timeout_s,
            interval=self.poll_interval_s,
            what=f"server {name} to go",
            error=IbmError(
                f"server {name} (id {guest_id}) was cancelled but is still "
                f"listed after {self.ready_timeout_s:.0f}s; check: ibmcloud sl vs detail {guest_id}"
            ),
        )

    @staticmethod
    def _exists(vs: SoftLayer.VSManager, guest_id: int) -> bool:
        """Still listed and still billed (a cancelled hourly guest loses its billing item, then disappears)."""
        try:
            guest = vs.get_instance(guest_id, mask="mask[id,billingItem[id]]")
        except SoftLayer.SoftLayerAPIError as exc:
            if _not_found(exc):
                return False
            raise
        return bool(guest.get("billingItem"))

    # -- read, diff, update ---------------------------------------------------------------
    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        vs = SoftLayer.VSManager(self.client())
        try:
            guest = vs.get_instance(int(id_), mask=READY_MASK)
        except SoftLayer.SoftLayerAPIError as exc:
            if _not_found(exc):
                return ReadResult(None, {})  # gone: Pulumi drops it from state
            raise _api_error(f"read server {id_}", exc) from None
        return ReadResult(id_, _outputs(props, guest))

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = [k for k in REPLACES if olds.get(k) != news.get(k)]
        old_disks, new_disks = list(olds.get("disks") or []), list(news.get("disks") or [])
        if new_disks[: len(old_disks)] != old_disks:
            replaces.append("disks")  # a disk shrunk or was removed: only a new server does that
        if olds.get("flavor") != news.get("flavor") and not self._is_upgrade(olds.get("flavor"), news.get("flavor")):
            replaces.append("flavor")
        changed = [k for k in set(olds) | set(news) if k not in _OUTPUT_ONLY and olds.get(k) != news.get(k)]
        return DiffResult(changes=bool(changed), replaces=sorted(replaces), delete_before_replace=True)

    def _is_upgrade(self, old: str | None, new: str | None) -> bool:
        if old not in self.flavor_sizes or new not in self.flavor_sizes:
            return False
        return all(n >= o for o, n in zip(self.flavor_sizes[old], self.flavor_sizes[new], strict=True))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        vs = SoftLayer.VSManager(self.client())
        guest_id = int(id_)
        added = list(news.get("disks") or [])[len(olds.get("disks") or []) :]
        flavor = news["flavor"] if news.get("flavor") != olds.get("flavor") else None
        nic = news.get("nic_speed") if news.get("nic_speed") != olds.get("nic_speed") else None
        try:
            if flavor or nic or added:
                vs.upgrade(
                    guest_id, preset=flavor, nic_speed=nic, disk=[{"capacity": gb, "number": 0} for gb in added] or None
                )
            if news.get("tags") != olds.get("tags"):
                vs.set_tags(",".join(news.get("tags") or []), guest_id=guest_id)
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"upgrade server {news['hostname']} (id {guest_id})", exc) from None
        guest = self._wait_ready(vs, guest_id, news["hostname"], pending=True)
        return UpdateResult(_outputs(news, guest))

    # -- delete ---------------------------------------------------------------------------
    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self._cancel_and_confirm(SoftLayer.VSManager(self.client()), int(id_), props.get("hostname", id_))


_OUTPUT_ONLY = ("public_ip", "private_ip", "guest_id", "__provider")


def _order(props: dict[str, Any]) -> dict[str, Any]:
    """Pulumi inputs -> VSManager.create_instance arguments (what `ibmcloud sl vs create` sends)."""
    order = {
        "hostname": props["hostname"],
        "domain": props["domain"],
        "datacenter": props["datacenter"],
        "flavor": props["flavor"],
        "hourly": bool(props.get("hourly", True)),
        "local_disk": bool(props.get("local_disk", False)),
        "disks": [int(d) for d in props.get("disks") or []] or None,
        "nic_speed": props.get("nic_speed"),
        "ssh_keys": [int(k) for k in props.get("ssh_key_ids") or []] or None,
        "private_vlan": props.get("private_vlan"),
        "userdata": props.get("user_data"),
    }
    if props.get("image_id"):
        order["image_id"] = props["image_id"]
    else:
        order["os_code"] = props["os_code"]
    if props.get("tags"):
        order["tags"] = ",".join(props["tags"])
    return {k: v for k, v in order.items() if v is not None}


def _outputs(props: dict[str, Any], guest: dict[str, Any]) -> dict[str, Any]:
    return {
        **props,
        "guest_id": int(guest["id"]),
        "public_ip": guest.get("primaryIpAddress"),
        "private_ip": guest.get("primaryBackendIpAddress"),
    }


TAG_PREFIX = "trainrig-cluster:"


class Listing(_Credentials):
    """The account's own list of a cluster's servers (what still bills), by the tag every server carries."""

    def __init__(self, transport=None, credentials: tuple[str, str] | None = None):
        self.transport = transport  # tests only: the SDK's fixture transport
        # The stack's secret config, when the credentials were kept there rather than in the environment.
        self._stack_credentials = credentials

    def servers(self, cluster: str) -> list[str]:
        try:
            guests = SoftLayer.VSManager(self.client()).list_instances(
                tags=[f"trainrig-cluster:{cluster}"], mask="id,hostname"
            )
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"list the servers of cluster {cluster}", exc) from None
        return [f"virtual server {g['id']} ({g['hostname']})" for g in guests]

    def audit(self, clusters: set[str], everything: bool) -> list[Billable]:
        """The account's virtual servers tagged trainrig-cluster:<name>, and the SAN disks each one bills for."""
        mask = "id,hostname,datacenter[name],tagReferences[tag[name]],blockDevices[device,diskImage[capacity,units]]"
        try:
            guests = self.client().call("SoftLayer_Account", "getVirtualGuests", mask=mask, iter=True)
            guests = list(guests)
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error("list the account's virtual servers", exc) from None
        found: list[Billable] = []
        for guest in guests:
            tags = [ref.get("tag", {}).get("name", "") for ref in guest.get("tagReferences", [])]
            cluster = next((t.removeprefix(TAG_PREFIX) for t in tags if t.startswith(TAG_PREFIX)), None)
            if not cluster or not (everything or cluster in clusters):
                continue
            node, where = guest["hostname"], guest.get("datacenter", {}).get("name", "")
            found.append(Billable(kind="virtual server", id=str(guest["id"]), cluster=cluster, node=node, detail=where))
            for device in guest.get("blockDevices", []):
                disk = device.get("diskImage") or {}
                if disk.get("capacity"):
                    found.append(
                        Billable(
                            kind="san volume",
                            id=f"{guest['id']}/disk{device.get('device')}",
                            cluster=cluster,
                            node=node,
                            detail=f"{disk['capacity']} {disk.get('units', 'GB')}",
                        )
                    )
        return found
