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


class IbmCloud:
    name = "ibm"
    Config = IbmConfig
    capabilities = frozenset(
        {"pulumi_stack", "gpu", "memlock", "data_disk", "shared_storage", "ssh_mesh", "cancel_from_cluster"}
    )

    def build(self, parent, name, cfg, blueprint):
        from infra.clouds.ibm import program

        return program.build(parent, name, cfg, blueprint)

    def stand_in_image(self, reference: str) -> str | None:
        return None  # its nodes pull from public registries

    def backend(self, stack=None):
        from infra.automation import StackBackend

        return StackBackend(self, stack)

    def power(self, cluster: str, cfg: IbmConfig, on: bool) -> dict[str, str]:
        # Not "park" in its capabilities, so this is reached only by mistake; say why all the same.
        raise TrainrigError(
            f"IBM Cloud classic keeps billing a powered-off GPU server: cluster {cluster!r} cannot be parked, "
            "use fab down (storage kept)"
        )

    def switch_cancel(self, inv: Inventory, environ: Mapping[str, str] = os.environ) -> CancelPlan:
        """The GPU servers' guest ids and the switch's own cancel-only API user (never the operator's)."""
        missing = [n.name for n in inv.gpu_nodes if not n.cloud_id]
        if missing:
            raise TrainrigError(
                f"the inventory of {inv.cluster!r} holds no IBM server id for {', '.join(missing)}, so the dead-man "
                f"switch could not cancel them: run pulumi up --refresh --stack {inv.stack or 'NAME'} to record them"
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
