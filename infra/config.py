"""The stack configuration: `trainrig:*` keys of a Pulumi stack, validated into its cloud's typed model first.

StackConfig is one model per cloud, picked by `cloud`: each cloud's package (infra/clouds/<cloud>)
defines its model on StackBase, or on MachineStack when machines are ordered by flavor. The same
model is read two ways: by the Pulumi program (from the engine's config) and by `fab plan` (from
the stack file, without the Pulumi CLI). Every error is one line that names the key and says what
to set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator

from infra import catalog, clouds
from infra.errors import TrainrigError
from infra.inventory import Inventory, OnIdle, gpu_node_names
from infra.models import Strict
from infra.state import CLUSTER_NAME

NAMESPACE = "trainrig"
ROOT = Path(__file__).resolve().parents[1]
SSH_PUBLIC_KEY = r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256) [A-Za-z0-9+/=]+( .*)?$"
SECRET_MARK = "(secret)"
# An admin_cidr wider than this prefix needs trainrig:admin_cidr_wide: true.
WIDEST_ADMIN_PREFIX = 8


class ConfigError(TrainrigError):
    """A stack configuration error that names its key."""

    def __init__(self, key: str, problem: str, hint: str = "", namespaced: bool = True):
        name = f"{NAMESPACE}:{key}" if namespaced else key
        super().__init__(f"{name}: {problem}" + (f"; {hint}" if hint else ""))
        self.key = key


class StackBase(Strict):
    """What every cloud's stack has. Subclasses set `cloud` to a Literal of their name."""

    # What each key is for and what to set when it is wrong: the second half of every error line.
    hints: ClassVar[dict[str, str]] = {
        "cluster": "set trainrig:cluster to 1-31 lowercase letters, digits or '-', starting with a letter",
        "gpu_nodes": "set trainrig:gpu_nodes to the number of GPU nodes (0 keeps only storage)",
        "data_disk_gb": "set trainrig:data_disk_gb to the data disk size of each GPU node in GB",
        "on_idle": "set trainrig:on_idle to down (the dead-man switch ends the GPU nodes) or park (it stops them)",
    }
    # Keys whose values must be Pulumi secrets in a stack file.
    secret_keys: ClassVar[tuple[str, ...]] = ()

    cloud: str
    cluster: str = Field(pattern=CLUSTER_NAME.pattern)
    gpu_nodes: int = Field(ge=0, le=64)
    data_disk_gb: int = Field(default=100, ge=1, le=16000)
    tags: dict[str, str] = {}
    on_idle: OnIdle = Field(
        default="down",
        description="what the dead-man switch does to the GPU nodes: end them (storage kept) or park them (disks kept)",
    )

    @model_validator(mode="after")
    def _can_park(self) -> StackBase:
        capabilities = clouds.get(self.cloud).capabilities
        if self.on_idle == "park" and "park" not in capabilities:
            raise ConfigError(
                "on_idle",
                f"{self.cloud} GPU nodes cannot be parked (a stopped one keeps billing)",
                "set trainrig:on_idle: down",
            )
        # The switch parks a node by powering it off; where that does not stop the bill (IBM parks by a
        # flavor change, ordered with the operator's own credentials), only `fab park` can park.
        if self.on_idle == "park" and "self_teardown" not in capabilities:
            raise ConfigError(
                "on_idle",
                f"the dead-man switch cannot park {self.cloud} GPU nodes (a powered-off one keeps billing)",
                "set trainrig:on_idle: down; fab park parks them from your machine",
            )
        return self

    # -- what the rest of trainrig asks of any cloud's config -----------------------------
    @property
    def prices(self) -> catalog.Prices:
        return catalog.load(self.cloud)

    @property
    def machine(self) -> catalog.Machine | None:
        """The GPU nodes' machine in the price table; None where nothing is ordered."""
        return None

    @property
    def storage_machine(self) -> catalog.Machine | None:
        return None

    @property
    def gpus(self) -> int:
        return self.machine.gpus if self.machine else 0

    @property
    def shared_fs(self) -> bool:
        """Storage is a managed file system (no storage node to run)."""
        return False

    @property
    def storage_size_gb(self) -> int:
        return self.data_disk_gb

    @property
    def where(self) -> str:
        return "this machine"

    def notes(self) -> list[str]:
        """Lines `fab plan` prints under the price table."""
        return []

    def gpu_node_names(self) -> list[str]:
        return gpu_node_names(self.gpu_nodes)

    def check_credentials(self, environ: Mapping[str, str] = os.environ) -> None:
        """Refuse early, naming what to set, when the cloud's credentials are nowhere to be found."""


class MachineStack(StackBase):
    """A cloud whose nodes are machines ordered by flavor, reached over SSH from the operator's address."""

    hints: ClassVar[dict[str, str]] = {
        **StackBase.hints,
        "admin_cidr": "set trainrig:admin_cidr to the address you connect from, e.g. 203.0.113.7/32",
        "ssh_public_key": "set trainrig:ssh_public_key to the one line of your ~/.ssh/id_ed25519.pub",
        "storage_disk_gb": "set trainrig:storage_disk_gb to the NFS disk size in GB (at least 1)",
    }
    machine_word: ClassVar[str] = "flavor"

    flavor: str = Field(description="the GPU nodes' machine: an IBM flavor or an AWS instance type")
    gpus_per_node: int | None = Field(default=None, ge=0, description="derived from the flavor when omitted")
    storage_flavor: str | None = None
    storage_disk_gb: int = Field(description="NFS disk size; with a managed file system, the GB the estimate assumes")
    image: str | None = None
    storage_image: str | None = Field(default=None, description="a baked storage node (fab bake); default: Ubuntu")
    ssh_public_key: str = Field(pattern=SSH_PUBLIC_KEY)
    ssh_private_key_file: str = "~/.ssh/id_ed25519"
    ssh_user: str | None = None
    admin_cidr: IPv4Network
    admin_cidr_wide: bool = Field(default=False, description="accept an admin_cidr wider than /8")

    @model_validator(mode="after")
    def _machines_exist(self) -> MachineStack:
        if self.admin_cidr.prefixlen == 0:
            raise ConfigError(
                "admin_cidr", f"{self.admin_cidr} opens SSH to the whole internet", self.hints["admin_cidr"]
            )
        if self.admin_cidr.prefixlen < WIDEST_ADMIN_PREFIX and not self.admin_cidr_wide:
            raise ConfigError(
                "admin_cidr",
                f"{self.admin_cidr} opens SSH to {self.admin_cidr.num_addresses:,} addresses",
                "narrow it to where you connect from, or set trainrig:admin_cidr_wide: true if you mean it",
            )
        if self.storage_disk_gb < 1:
            raise ConfigError(
                "storage_disk_gb", f"{self.storage_disk_gb} GB is not a disk", self.hints["storage_disk_gb"]
            )
        if self.storage_flavor is None and not self.shared_fs:
            raise ConfigError("storage_flavor", "missing", f"set trainrig:storage_flavor to a CPU {self.machine_word}")
        known = self.prices.machines
        for key in ("flavor",) if self.shared_fs else ("flavor", "storage_flavor"):
            name = getattr(self, key)
            if name not in known:
                choices = sorted(k for k, m in known.items() if (m.gpus > 0) == (key == "flavor"))
                raise ConfigError(
                    key, f"unknown {self.machine_word} {name!r}", f"set trainrig:{key} to one of: {', '.join(choices)}"
                )
        machine = known[self.flavor]
        if machine.gpus == 0:
            raise ConfigError(
                "flavor",
                f"{self.flavor} has no GPU",
                f"choose a GPU {self.machine_word} (see infra/clouds/{self.cloud}/prices.yaml)",
            )
        if self.gpus_per_node is not None and self.gpus_per_node != machine.gpus:
            raise ConfigError(
                "gpus_per_node",
                f"{self.flavor} has {machine.gpus} GPU(s), not {self.gpus_per_node}",
                f"remove trainrig:gpus_per_node or choose a {self.machine_word} with {self.gpus_per_node} GPUs",
            )
        return self

    @property
    def machine(self) -> catalog.Machine:
        return self.prices.machines[self.flavor]

    @property
    def storage_machine(self) -> catalog.Machine | None:
        return self.prices.machines.get(self.storage_flavor) if self.storage_flavor else None

    @property
    def storage_size_gb(self) -> int:
        return self.storage_disk_gb

    @property
    def login_user(self) -> str:
        return self.ssh_user or "root"

    @property
    def private_key_path(self) -> Path:
        return Path(os.path.expanduser(self.ssh_private_key_file))


# The type every consumer names: one of the registered clouds' models.
StackConfig = StackBase


def validate(raw: Mapping[str, Any], source: str = "stack") -> StackConfig:
    """Raw `trainrig:*` values (namespace stripped) -> the cloud's model, or a one-line ConfigError."""
    values = {k: _decode(v) for k, v in raw.items()}
    model = _model_for(values.get("cloud"), source)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _one_line(exc, model, values["cloud"]) from None


def _model_for(cloud: Any, source: str) -> type[StackBase]:
    names = clouds.names()
    if cloud is None:
        raise ConfigError("cloud", f"missing in {source}", f"set trainrig:cloud to one of: {', '.join(names)}")
    if cloud not in names:
        raise ConfigError("cloud", f"unknown cloud {cloud!r}", f"set trainrig:cloud to one of: {', '.join(names)}")
    return clouds.get(cloud).Config


def _one_line(exc: ValidationError, model: type[StackBase], cloud: str) -> ConfigError:
    """The error to show: an unknown key first (a typo explains the 'missing' errors that follow it)."""
    errors = exc.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    key = str(first["loc"][0]) if first["loc"] else "(top level)"
    if first["type"] == "extra_forbidden":
        owners = [c.name for c in clouds.all_clouds() if key in c.Config.model_fields]
        problem = f"does not apply to cloud {cloud}" if owners else "unknown key"
        return ConfigError(key, problem, "remove it from the stack")
    problem = "missing" if first["type"] == "missing" else f"{first['input']!r}: {first['msg']}"
    return ConfigError(key, problem, model.hints.get(key, ""))


def _decode(value: Any) -> Any:
    """Pulumi hands structured values to the program as JSON text; the stack file has them as YAML."""
    if isinstance(value, dict) and set(value) == {"secure"}:
        return SECRET_MARK
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# -- stack files in stacks/ ----------------------------------------------------------------
def available(root: Path = ROOT) -> list[str]:
    return sorted(p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in (root / "stacks").glob("Pulumi.*.yaml"))


def stack_file(stack: str, root: Path = ROOT) -> Path:
    """A stack name (stacks/Pulumi.<name>.yaml) or a path to a stack file."""
    candidate = Path(stack)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return root / "stacks" / f"Pulumi.{stack}.yaml"


def load_stack_file(path: Path) -> StackConfig:
    """Read a Pulumi stack file without the Pulumi CLI (what `fab plan` does)."""
    if not path.is_file():
        raise TrainrigError(f"stack file {path} does not exist; pick a stack with --stack (see stacks/)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainrigError(f"stack file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise TrainrigError(f"stack file {path} has no 'config:' mapping")
    ours = _ours(config)
    model = _model_for(ours.get("cloud"), str(path))
    for key in model.secret_keys:
        value = ours.get(key)
        if value is not None and not (isinstance(value, dict) and "secure" in value):
            raise ConfigError(
                key, "is stored in plain text", f"remove it and run: pulumi config set --secret {key} VALUE"
            )
    return validate(ours, source=str(path))


def load_named(stack: str | None, root: Path = ROOT, environ: Mapping[str, str] = os.environ) -> StackConfig:
    """A validated stack config with its credentials checked, or a one-line error."""
    if not stack:
        raise TrainrigError(
            f"no stack selected; pass --stack NAME (one of: {', '.join(available(root))}) "
            "or set trainrig.stack in your Fabric config"
        )
    cfg = load_stack_file(stack_file(stack, root))
    cfg.check_credentials(environ)
    return cfg


def check_cluster_credentials(inv: Inventory, root: Path = ROOT, environ: Mapping[str, str] = os.environ) -> None:
    """The credentials of the cloud a cluster lives on, checked as for `pulumi up`: with its stack file's
    settings when there is one (IBM may keep its key among the stack's secrets), else the environment alone
    (no setting then counts: the model is built unvalidated, with its defaults, for the check only)."""
    path = stack_file(inv.stack, root) if inv.stack else None
    if path is not None and path.is_file():
        cfg = load_stack_file(path)
    else:
        model = clouds.get(inv.cloud).Config
        cfg = model.model_construct(cloud=inv.cloud, cluster=inv.cluster, gpu_nodes=len(inv.gpu_nodes))
    cfg.check_credentials(environ)


def from_pulumi_config(values: Mapping[str, Any]) -> StackConfig:
    """The engine's config map ({'trainrig:cloud': 'aws', ...}) -> the cloud's model."""
    return validate(_ours(values), source="the stack config")


def _ours(config: Mapping[str, Any]) -> dict[str, Any]:
    prefix = f"{NAMESPACE}:"
    return {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}


def secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
