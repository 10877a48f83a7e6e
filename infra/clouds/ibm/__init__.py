"""IBM Cloud classic (SoftLayer): virtual servers with SAN disks, one of them an NFS server, over the softlayer SDK."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from infra.clouds import CancelPlan
from infra.config import ConfigError, MachineStack, secret
from infra.errors import TrainrigError
from infra.inventory import Inventory

# The SAN disk sizes IBM Cloud classic sells for a virtual server's second to fifth disk, in GB: the
# catalog items GUEST_DISK_<size>_GB_SAN of the virtual server package, as terraform-provider-ibm
# maps them (ibm/resource_ibm_storage_file.go, portablestorageMap). 2,000 GB is the largest; a
# server has at most five disks (boot disk included).
SAN_DISK_SIZES_GB = (
    10,
    20,
    25,
    30,
    40,
    50,
    75,
    100,
    125,
    150,
    175,
    200,
    250,
    300,
    350,
    400,
    500,
    750,
    1000,
    1500,
    2000,
)
# The dead-man switch's own IBM classic API user (README: "IBM: the dead-man switch's credential"):
# from the environment, else from the stack's secret config.
CANCEL_ENV = ("TRAINRIG_IBM_CANCEL_USERNAME", "TRAINRIG_IBM_CANCEL_API_KEY")
SOFTLAYER_API = "https://api.softlayer.com/rest/v3.1/"
# IBM Cloud tags (cloud.ibm.com/docs/account?topic=account-tag): up to 128 characters of letters,
# digits, spaces, '_', '-', '.' and ':'. A comma would split one tag into two (set_tags takes a list).
TAG = re.compile(r"^[A-Za-z0-9 _.:-]{1,128}$")


class IbmConfig(MachineStack):
    hints: ClassVar[dict[str, str]] = {
        **MachineStack.hints,
        "datacenter": "set trainrig:datacenter to an IBM Cloud classic datacenter, e.g. dal10",
    }
    secret_keys: ClassVar[tuple[str, ...]] = ("sl_api_key", "sl_username", "cancel_username", "cancel_api_key")

    cloud: Literal["ibm"]
    image: str | None = Field(default=None, description="OS code, or a private image by number or GUID")
    datacenter: str = Field(pattern=r"^[a-z]{3}[0-9]{2}$")
    hourly: bool = True
    nic_speed: int = 1000
    private_vlan: int | None = None
    domain: str = Field(default="trainrig.example", pattern=r"^[a-z0-9.-]+\.[a-z]{2,}$")
    sl_username: SecretStr | None = None
    sl_api_key: SecretStr | None = None
    cancel_username: SecretStr | None = Field(
        default=None, description="the dead-man switch's API user: Cancel Server only, on this cluster's servers"
    )
    cancel_api_key: SecretStr | None = None
    park_flavor: str | None = Field(
        default=None,
        description="the CPU flavor `fab park` changes the GPU servers to (default: B1_2X4X<first disk of flavor>)",
    )

    @model_validator(mode="after")
    def _nic_offered(self) -> IbmConfig:
        if self.nic_speed not in (100, 1000, 10000):
            raise ConfigError("nic_speed", f"{self.nic_speed} Mbps is not offered", "use 100, 1000 or 10000")
        for key in ("data_disk_gb", "storage_disk_gb"):
            size = getattr(self, key)
            if size not in SAN_DISK_SIZES_GB:
                raise ConfigError(
                    key,
                    f"{size} GB is not a SAN disk size IBM Cloud classic sells",
                    f"choose one of {', '.join(map(str, SAN_DISK_SIZES_GB))} (GB; 2000 is the largest)",
                )
        for key, value in self.tags.items():
            tag = f"{key}:{value}"
            if not TAG.match(tag) or key.startswith("trainrig-"):
                raise ConfigError(
                    "tags",
                    f"{tag!r} is not a tag IBM Cloud accepts",
                    "use letters, digits, spaces, '_', '-', '.' (at most 128 characters in key:value, "
                    "keys not starting with trainrig-)",
                )
        return self

    @model_validator(mode="after")
    def _park_flavor_fits(self) -> IbmConfig:
        known = self.prices.machines
        machine = known.get(self.park_machine)
        if machine is None or machine.gpus:
            cpu = sorted(k for k, m in known.items() if not m.gpus and _first_disk(k) == _first_disk(self.flavor))
            raise ConfigError(
                "park_flavor",
                f"{self.park_machine} is not a CPU flavor in infra/clouds/ibm/prices.yaml",
                f"choose one of {', '.join(cpu)}",
            )
        if _first_disk(self.park_machine) != _first_disk(self.flavor):
            # An in-place flavor change keeps the boot disk: a flavor with another first disk cannot take it.
            raise ConfigError(
                "park_flavor",
                f"{self.park_machine} has a {_first_disk(self.park_machine)} GB first disk, {self.flavor} one of "
                f"{_first_disk(self.flavor)} GB",
                "choose a CPU flavor ending in X" + _first_disk(self.flavor),
            )
        return self

    @property
    def park_machine(self) -> str:
        """The flavor a parked GPU server runs as: the smallest balanced one with the same first disk."""
        return self.park_flavor or f"B1_2X4X{_first_disk(self.flavor)}"

    @property
    def where(self) -> str:
        return self.datacenter

    @property
    def stack_credentials(self) -> tuple[str, str] | None:
        username, api_key = secret(self.sl_username), secret(self.sl_api_key)
        return (username, api_key) if username and api_key else None

    def notes(self) -> list[str]:
        return [] if self.hourly else ["monthly billing: priced here at the hourly rate"]

    def check_credentials(self, environ: Mapping[str, str] = os.environ) -> None:
        home = Path(environ.get("HOME", "~")).expanduser()
        in_env = environ.get("SL_USERNAME") and environ.get("SL_API_KEY")
        in_stack = self.sl_username is not None and self.sl_api_key is not None
        if not (in_env or in_stack or (home / ".softlayer").is_file()):
            raise ConfigError(
                "SL_USERNAME/SL_API_KEY",
                "IBM Cloud classic credentials are missing",
                "export SL_USERNAME and SL_API_KEY, or: pulumi config set --secret sl_api_key KEY (and sl_username)",
                namespaced=False,
            )


def _first_disk(flavor: str) -> str:
    """The first (boot) disk's GB in a flavor's key name: AC1_8X60X100 -> 100."""
    return flavor.rsplit("X", 1)[-1]


class IbmCloud:
    name = "ibm"
    Config = IbmConfig
    capabilities = frozenset(
        {"pulumi_stack", "gpu", "memlock", "data_disk", "shared_storage", "ssh_mesh", "cancel_from_cluster", "park"}
    )

    def build(self, parent, name, cfg, blueprint):
        from infra.clouds.ibm import program

        return program.build(parent, name, cfg, blueprint)

    def stand_in_image(self, reference: str) -> str | None:
        return None  # its nodes pull from public registries

    def backend(self, stack=None):
        from infra.automation import StackBackend

        return StackBackend(self, stack)

    def power(
        self, inv: Inventory, cfg: IbmConfig, on: bool, transport=None, timeout: float = 3600, interval: float = 15
    ) -> dict[str, str]:
        """Park: change each GPU server's flavor in place to cfg.park_machine, a small CPU one; resume: back to
        the flavor the inventory recorded. Disks, addresses and everything installed stay.

        Why not power-off: IBM's suspend billing (billing stops while powered off through the API)
        covers the balanced, compute, memory and variable-compute families only; a powered-off GPU
        flavor (AC1/AC2) bills in full. A parked server bills its park flavor and its disks instead
        (prices.yaml). The servers change all at once. A park that IBM refuses for one server changes
        the others back, so the cluster is not left half parked; a resume that fails half-way is run
        again by the next `fab up`, and a server already at its flavor gets no second order."""
        from infra.clouds.ibm.softlayer import VirtualServerProvider

        unknown = [n.name for n in inv.gpu_nodes if not (n.cloud_id and n.flavor)]
        if unknown:
            raise TrainrigError(
                f"the inventory of {inv.cluster!r} holds no IBM server id or flavor for {', '.join(unknown)}: "
                f"run pulumi up --refresh --stack {inv.stack or 'NAME'} to record them"
            )
        if not inv.gpu_nodes:
            raise TrainrigError(f"cluster {inv.cluster!r} has no GPU servers to {'resume' if on else 'park'}")
        from infra import catalog, ssh

        sizes = {k: (m.cpus, m.memory_gb) for k, m in catalog.load("ibm").machines.items()}
        servers = VirtualServerProvider(
            ready_timeout_s=timeout,
            poll_interval_s=interval,
            flavor_sizes=sizes,
            transport=transport,
            credentials=cfg.stack_credentials,
        )

        def change(nodes, flavor_of) -> tuple[dict[str, dict], dict[str, TrainrigError]]:
            """Every server at once (each change reboots it: minutes); what became of each."""

            def one(node):
                try:
                    return servers.change_flavor(int(node.cloud_id), node.name, flavor_of(node)), None
                except TrainrigError as exc:
                    return None, exc

            results = ssh.on_nodes(nodes, one)
            return (
                {name: guest for name, (guest, _) in results.items() if guest is not None},
                {name: exc for name, (_, exc) in results.items() if exc is not None},
            )

        changed, failed = change(inv.gpu_nodes, (lambda n: n.flavor) if on else (lambda n: cfg.park_machine))
        if failed:
            why = "; ".join(str(exc) for exc in failed.values())
            if on:  # still parked: fab up again resumes the rest (a server already back is not ordered again)
                raise TrainrigError(f"{why}; run fab up --name {inv.cluster} again")
            if not changed:
                raise TrainrigError(why)
            _, stuck = change([n for n in inv.gpu_nodes if n.name in changed], lambda n: n.flavor)
            back = [name for name in changed if name not in stuck]
            tail = f"{', '.join(back)} changed back to their GPU flavor" if back else ""
            if stuck:
                tail += ("; " if tail else "") + "; ".join(f"{n} stays parked: {e}" for n, e in stuck.items())
            raise TrainrigError(f"{why}; {tail}" if stuck else f"{why}; {tail}, nothing is parked")
        return (
            {n.name: changed[n.name].get("primaryIpAddress") or n.public_address for n in inv.gpu_nodes} if on else {}
        )

    def switch_cancel(self, inv: Inventory, environ: Mapping[str, str] = os.environ) -> CancelPlan:
        """The GPU servers' guest ids and the switch's own cancel-only API user (never the operator's)."""
        missing = [n.name for n in inv.gpu_nodes if not n.cloud_id]
        if missing:
            raise TrainrigError(
                f"the inventory of {inv.cluster!r} holds no IBM server id for {', '.join(missing)}, so the dead-man "
                f"switch could not cancel them: run pulumi up --refresh --stack {inv.stack or 'NAME'} to record them"
            )
        if inv.on_idle == "park":
            raise TrainrigError(
                f"the dead-man switch cannot park {inv.cluster!r}'s IBM servers (its credential may only cancel "
                "them): set trainrig:on_idle: down, then pulumi up"
            )
        username, api_key = environ.get(CANCEL_ENV[0]), environ.get(CANCEL_ENV[1])
        if not (username and api_key) and inv.stack:
            from infra import automation

            cfg = automation.stack_config(automation.select(inv.stack, "reading the dead-man switch's credential"))
            username, api_key = secret(cfg.cancel_username), secret(cfg.cancel_api_key)
        if not (username and api_key):
            raise TrainrigError(
                f"on IBM Cloud classic the dead-man switch cancels {inv.cluster!r}'s GPU servers with an API user of "
                f"its own, which is not set: export {CANCEL_ENV[0]} and {CANCEL_ENV[1]} (or pulumi config set "
                "--secret cancel_username / cancel_api_key); README: IBM: the dead-man switch's credential"
            )
        servers = {n.name: int(n.cloud_id) for n in inv.gpu_nodes if n.cloud_id}
        return CancelPlan(
            config={"softlayer": {"api": SOFTLAYER_API, "servers": servers}},
            credential=json.dumps({"username": username, "api_key": api_key}),
        )

    def capture(self, cluster: str, cfg: IbmConfig, node: str, name: str, transport=None) -> str:
        """An image template of the node's boot disk; `trainrig:image` takes its global id."""
        from infra.clouds.ibm.softlayer import Listing

        return Listing(transport, cfg.stack_credentials).capture(cluster, node, name)

    def audit(self, known, everything: bool, transport=None):
        """Virtual servers and their SAN disks by the trainrig-cluster: tag (credentials from the environment)."""
        from infra.clouds.ibm.softlayer import Listing

        return Listing(transport).audit(set(known), everything)

    def verify(self, cfg: IbmConfig, blueprint, transport=None):
        from infra.clouds.ibm import verify

        return verify.verify(cfg, blueprint, transport)

    def billable(self, cluster: str, cfg: IbmConfig | None, transport=None) -> list[str]:
        """What the account still lists for the cluster: one line per server, named by hostname."""
        from infra.clouds.ibm.softlayer import Listing

        return Listing(transport, cfg.stack_credentials if cfg else None).servers(cluster)


CLOUD = IbmCloud()
