"""Pulumi dynamic providers for IBM Cloud classic (SoftLayer): virtual servers and SSH keys, on the softlayer SDK.

Pulumi pickles a dynamic provider into the stack's state, so no credentials ever live on one:
each method builds its own client from the environment (SL_USERNAME / SL_API_KEY, or
~/.softlayer) or from the stack's secret config handed to `configure`, which is dropped on
pickling. Waits poll the API with a deadline and ride out transient transport errors.

An order is checked with generateOrderTemplate before createObject places it. From the moment
createObject returns, the server bills: its id is kept, and any failure after that (tagging,
the wait, adding a disk) cancels it and says so, so no untagged, untracked server is left.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import SoftLayer
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, ResourceProvider, UpdateResult
from SoftLayer import utils as sl_utils

from infra.clouds import Billable
from infra.commands import wait_until
from infra.errors import TrainrigError

log = logging.getLogger("trainrig.ibm")

READY_MASK = (
    "mask[id,provisionDate,activeTransaction[id],lastTransaction[id],lastOperatingSystemReload[id],"
    "primaryIpAddress,primaryBackendIpAddress,hostname,domain,status]"
)
DISKS_MASK = "mask[id,billingItem[id,children[categoryCode]]]"
# A classic virtual server has at most five disks: the product catalog's disk categories run from
# guest_disk0 ("First Disk", the boot disk) to guest_disk4 ("Fifth Disk"); the softlayer SDK's
# VSManager.get_disk_category_id_by_disk_number knows no sixth.
MAX_DISKS = 5
FIRST_DATA_DEVICE = 2  # device 0 is the boot disk, 1 is swap: data disks are blockDevices 2, 3, ...
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
    "local_disk",
)
# user_data is read at first boot only: a new one (admin_cidr changed) is no reason to replace a
# server, and the protected storage server could not be. Provisioning applies the firewall change.


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


def transient(exc: BaseException) -> bool:
    """A failure of the connection or of IBM's side that the next poll may not meet (not a refusal)."""
    if isinstance(exc, (SoftLayer.exceptions.ServerError, SoftLayer.exceptions.RemoteSystemError)):
        return True
    if isinstance(exc, SoftLayer.exceptions.TransportError):
        code = exc.faultCode
        return not isinstance(code, int) or code == 0 or code == 429 or code >= 500
    return False


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

    def __init__(
        self,
        ready_timeout_s: float = 3600,
        poll_interval_s: float = 15,
        flavor_sizes=None,
        transport=None,
        credentials: tuple[str, str] | None = None,
    ):
        super().__init__()
        self._stack_credentials = credentials  # outside Pulumi (fab park): the stack's secret config, if there
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        # {flavor: (cpus, memory_gb)}: tells an upgrade (bigger) from a change that needs a new server.
        self.flavor_sizes = dict(flavor_sizes or {})
        self.transport = transport  # tests only: the SDK's fixture transport

    # -- create ---------------------------------------------------------------------------
    def create(self, props: dict[str, Any]) -> CreateResult:
        vs = SoftLayer.VSManager(self.client())
        name = props["hostname"]
        _check_disk_count(props)
        image = props.get("image_id")
        if image and str(image).isdigit():
            image = self._global_identifier(int(image))
        order = create_order(vs, props, image)
        what = f"server {name} ({props['flavor']} in {props['datacenter']})"
        try:
            # Prices, flavor, disks and datacenter checked by the API, nothing billed yet.
            vs.guest.generateOrderTemplate(order)
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"accept the order for {what}", exc) from None
        try:
            created = vs.guest.createObject(order)
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"order {what}", exc) from None
        guest_id = int(created["id"])  # billing from here on: kept before anything else can fail
        try:
            guest = self._finish_create(vs, guest_id, props, image)
        except BaseException as exc:
            self._cancel_and_confirm(vs, guest_id, name)
            if isinstance(exc, SoftLayer.SoftLayerAPIError):
                raise IbmError(
                    f"server {name} (id {guest_id}) was ordered, then IBM Cloud classic refused: "
                    f"{exc.faultString} ({exc.faultCode}); the order was cancelled"
                ) from None
            raise
        return CreateResult(str(guest_id), _outputs(props, guest))

    def _finish_create(self, vs: SoftLayer.VSManager, guest_id: int, props: dict[str, Any], image) -> dict:
        """Tag, wait until ready and, for a private image, add the data disks: the steps after billing starts."""
        name = props["hostname"]
        if props.get("tags"):
            vs.set_tags(",".join(props["tags"]), guest_id=guest_id)
        guest = self._wait_ready(vs, guest_id, name)
        disks = [int(d) for d in props.get("disks") or []]
        if image and disks:
            # The API refuses blockDevices with an image template ("Block devices may not be provided
            # when using an image template", softlayer-python #325): the data disks come by upgrade.
            guest = self._upgrade(vs, guest_id, name, disks=_numbered(disks, 0))
        return guest

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

    def _poll(self, vs: SoftLayer.VSManager, guest_id: int, mask: str = READY_MASK) -> dict | None:
        """The guest, or None when the API could not be reached this time (the wait goes on)."""
        try:
            return vs.get_instance(guest_id, mask=mask)
        except SoftLayer.SoftLayerAPIError as exc:
            if transient(exc):
                log.warning("server %s: transient API error while waiting (%s); polling again", guest_id, exc)
                return None
            raise

    def _wait_ready(self, vs: SoftLayer.VSManager, guest_id: int, name: str, pending: bool = False) -> dict:
        def ready() -> dict | None:
            guest = self._poll(vs, guest_id)
            return guest if guest is not None and sl_utils.is_ready(guest, pending) else None

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

    def _upgrade(
        self,
        vs: SoftLayer.VSManager,
        guest_id: int,
        name: str,
        preset: str | None = None,
        nic_speed: int | None = None,
        disks: list[dict] | None = None,
    ) -> dict:
        """Place an upgrade order and wait for IBM to start and then finish it (a resize reboots the server)."""
        before = self._poll(vs, guest_id) or {}
        last = sl_utils.lookup(before, "lastTransaction", "id")
        if disks:
            self._check_disk_numbers(vs, guest_id, name, disks)
        if not vs.upgrade(guest_id, preset=preset, nic_speed=nic_speed, disk=disks or None):
            return before

        def started() -> bool:
            guest = self._poll(vs, guest_id)
            if guest is None:
                return False
            return bool(guest.get("activeTransaction")) or sl_utils.lookup(guest, "lastTransaction", "id") != last

        wait_until(
            started,
            timeout=self.ready_timeout_s,
            interval=self.poll_interval_s,
            what=f"the upgrade of server {name} to start",
            error=IbmError(
                f"the upgrade of server {name} (id {guest_id}) did not start within {self.ready_timeout_s:.0f}s; "
                f"check: ibmcloud sl vs detail {guest_id}"
            ),
        )
        return self._wait_ready(vs, guest_id, name, pending=True)

    def change_flavor(self, guest_id: int, name: str, flavor: str) -> dict:
        """Change a server's flavor in place, smaller or bigger (`fab park` / `fab up`), and wait until it is
        ready again; its disks and addresses stay. The ready server."""
        vs = SoftLayer.VSManager(self.client())
        try:
            if flavor in self.flavor_sizes:
                # Already that size (a park or resume that went half-way and runs again): no order, which
                # IBM would refuse as no change, only the wait.
                cpus, memory_gb = self.flavor_sizes[flavor]
                size = self._poll(vs, guest_id, "mask[id,maxCpu,maxMemory]") or {}
                if (size.get("maxCpu"), size.get("maxMemory")) == (cpus, memory_gb * 1024):
                    return self._wait_ready(vs, guest_id, name, pending=True)
            return self._upgrade(vs, guest_id, name, preset=flavor)
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"change server {name} (id {guest_id}) to flavor {flavor}", exc) from None
        except SoftLayer.SoftLayerError as exc:  # the SDK's own refusal, e.g. a flavor the package does not offer
            raise IbmError(
                f"IBM Cloud classic refused to change server {name} (id {guest_id}) to flavor {flavor}: {exc}"
            ) from None

    def _check_disk_numbers(self, vs: SoftLayer.VSManager, guest_id: int, name: str, disks: list[dict]) -> None:
        """Each new disk's category must be free: an upgrade naming a disk that exists resizes it instead."""
        guest = self._poll(vs, guest_id, DISKS_MASK) or {}
        taken = {c.get("categoryCode") for c in sl_utils.lookup(guest, "billingItem", "children") or []}
        for disk in disks:
            category = f"guest_disk{disk['number'] - 1}"
            if category in taken:
                raise IbmError(
                    f"server {name} (id {guest_id}) already has a disk in {category}; adding one there would "
                    "resize it, so no disk was ordered: check the disks with ibmcloud sl vs detail "
                    f"{guest_id}"
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
            if transient(exc):
                return True  # not known to be gone: poll again
            raise
        return bool(guest.get("billingItem"))

    # -- read, diff, update ---------------------------------------------------------------
    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        vs = SoftLayer.VSManager(self.client())
        try:
            guest = vs.get_instance(int(id_), mask=READY_MASK.replace(",status]", ",status,billingItem[id]]"))
        except SoftLayer.SoftLayerAPIError as exc:
            if _not_found(exc):
                return ReadResult(None, {})  # gone: Pulumi drops it from state
            raise _api_error(f"read server {id_}", exc) from None
        if not guest.get("billingItem"):
            # Cancelled (by the dead-man switch, or by hand) and not yet reclaimed: gone for Pulumi too,
            # so the next update does not cancel it again.
            return ReadResult(None, {})
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
        name = news["hostname"]
        _check_disk_count(news)
        old_disks = [int(d) for d in olds.get("disks") or []]
        added = _numbered([int(d) for d in news.get("disks") or []][len(old_disks) :], len(old_disks))
        flavor = news["flavor"] if news.get("flavor") != olds.get("flavor") else None
        nic = int(news["nic_speed"]) if news.get("nic_speed") != olds.get("nic_speed") else None
        try:
            if news.get("tags") != olds.get("tags"):
                vs.set_tags(",".join(news.get("tags") or []), guest_id=guest_id)
            if flavor or nic or added:
                guest = self._upgrade(vs, guest_id, name, preset=flavor, nic_speed=nic, disks=added)
            else:
                guest = self._wait_ready(vs, guest_id, name, pending=True)
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"upgrade server {name} (id {guest_id})", exc) from None
        return UpdateResult(_outputs(news, guest))

    # -- delete ---------------------------------------------------------------------------
    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self._cancel_and_confirm(SoftLayer.VSManager(self.client()), int(id_), props.get("hostname", id_))


_OUTPUT_ONLY = ("public_ip", "private_ip", "guest_id", "__provider")


def _numbered(sizes: list[int], existing: int) -> list[dict]:
    """Upgrade disks with explicit numbers: the SDK counts from the highest existing category otherwise,
    which is the current data disk, and the order would resize it. Number n is catalog category
    guest_disk(n-1); the boot disk is guest_disk0 (number 1), data disk i is number i + 2."""
    return [{"capacity": gb, "number": existing + i + 2} for i, gb in enumerate(sizes)]


def _check_disk_count(props: dict[str, Any]) -> None:
    disks = props.get("disks") or []
    if 1 + len(disks) > MAX_DISKS:
        raise IbmError(
            f"server {props['hostname']}: {1 + len(disks)} disks asked, a classic virtual server has at most "
            f"{MAX_DISKS} (the boot disk and {MAX_DISKS - 1} data disks)"
        )


def create_order(vs: SoftLayer.VSManager, props: dict[str, Any], image_guid: str | None) -> dict[str, Any]:
    """Pulumi inputs -> the SoftLayer_Virtual_Guest template that generateOrderTemplate and createObject take.

    The flavor brings the boot disk (terraform-provider-ibm sends no device 0 with a flavor either),
    so only the data disks go out, as devices 2, 3, ...; with an image template none do (the image
    brings the boot disk and the API refuses blockDevices with it). Pulumi hands numbers back as
    floats: every number is sent as an int.
    """
    args: dict[str, Any] = {
        "hostname": props["hostname"],
        "domain": props["domain"],
        "datacenter": props["datacenter"],
        "flavor": props["flavor"],
        "hourly": bool(props.get("hourly", True)),
        "local_disk": bool(props.get("local_disk", False)),
        "nic_speed": int(props["nic_speed"]) if props.get("nic_speed") else None,
        "ssh_keys": [int(k) for k in props.get("ssh_key_ids") or []] or None,
        "private_vlan": int(props["private_vlan"]) if props.get("private_vlan") else None,
        "userdata": props.get("user_data"),
    }
    if image_guid:
        args["image_id"] = image_guid
    else:
        args["os_code"] = props["os_code"]
    order = vs._generate_create_dict(**{k: v for k, v in args.items() if v is not None})
    disks = [int(d) for d in props.get("disks") or []]
    if disks and not image_guid:
        order["blockDevices"] = [
            {"device": str(n), "diskImage": {"capacity": gb}} for n, gb in enumerate(disks, start=FIRST_DATA_DEVICE)
        ]
    return order


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
                tags=[f"trainrig-cluster:{cluster}"], mask="id,hostname,billingItem[id]"
            )
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"list the servers of cluster {cluster}", exc) from None
        # A cancelled guest stays listed while IBM reclaims it, without its billing item: not billing.
        return [f"virtual server {g['id']} ({g['hostname']})" for g in guests if g.get("billingItem")]

    def capture(self, cluster: str, node: str, name: str, timeout: float = 3600, interval: float = 15) -> str:
        """An image template of the node's boot disk (where the driver, Docker and the toolkit live); its global id.

        IBM captures by a transaction on the server: the wait lasts until the server has none left.
        """
        from infra.commands import wait_until

        client = self.client()
        try:
            guests = SoftLayer.VSManager(client).list_instances(
                tags=[f"{TAG_PREFIX}{cluster}"], hostname=node, mask="id,hostname,billingItem[id]"
            )
            guest = next((g for g in guests if g.get("billingItem")), None)
            if guest is None:
                raise IbmError(f"IBM lists no server {node} of cluster {cluster} to bake")
            template = SoftLayer.VSManager(client).capture(guest["id"], f"trainrig-{name}", notes=f"{cluster}/{node}")
            wait_until(
                lambda: not client.call("SoftLayer_Virtual_Guest", "getActiveTransactions", id=guest["id"]),
                timeout=timeout,
                interval=interval,
                what=f"IBM to finish capturing {node}",
            )
            image = client.call(
                "SoftLayer_Virtual_Guest_Block_Device_Template_Group",
                "getObject",
                id=template["id"],
                mask="id,globalIdentifier",
            )
        except SoftLayer.SoftLayerAPIError as exc:
            raise _api_error(f"capture {node} of cluster {cluster}", exc) from None
        return image.get("globalIdentifier") or str(image["id"])

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
