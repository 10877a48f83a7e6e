"""The stack configuration: `trainrig:*` keys of a Pulumi stack, validated into one typed model before anything is created.

The same model is read two ways: by the Pulumi program (from the engine's config) and by
`fab plan` (from the stack file, without the Pulumi CLI). Every error is one line that names
the key and says what to set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from cluster.errors import TrainrigError
from cluster.state import CLUSTER_NAME
from infra import catalog

NAMESPACE = "trainrig"
CLOUDS = ("ibm", "aws", "local")
SSH_PUBLIC_KEY = r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256) [A-Za-z0-9+/=]+( .*)?$"
SECRET_MARK = "(secret)"

# What each key is for and what to set when it is wrong: the second half of every error line.
HINTS = {
    "cloud": "set trainrig:cloud to one of: ibm, aws, local",
    "cluster": "set trainrig:cluster to 1-31 lowercase letters, digits or '-', starting with a letter",
    "gpu_nodes": "set trainrig:gpu_nodes to the number of GPU nodes (0 keeps only storage)",
    "admin_cidr": "set trainrig:admin_cidr to the address you connect from, e.g. 203.0.113.7/32",
    "ssh_public_key": "set trainrig:ssh_public_key to the one line of your ~/.ssh/id_ed25519.pub",
    "data_disk_gb": "set trainrig:data_disk_gb to the data disk size of each GPU node in GB",
    "storage_disk_gb": "set trainrig:storage_disk_gb to the NFS disk size in GB (at least 1)",
    "storage": "set trainrig:storage to nfs_server (an NFS server instance with an EBS disk) or efs (AWS only)",
    "datacenter": "set trainrig:datacenter to an IBM Cloud classic datacenter, e.g. dal10",
    "region": "set trainrig:region to an AWS region, e.g. us-east-1",
}

PER_CLOUD = {
    "ibm": {"flavor", "gpus_per_node", "storage_flavor", "storage_disk_gb", "image", "datacenter", "ssh_public_key",
            "ssh_private_key_file", "ssh_user", "admin_cidr", "hourly", "nic_speed", "private_vlan", "domain",
            "sl_username", "sl_api_key"},
    "aws": {"flavor", "gpus_per_node", "storage_flavor", "storage_disk_gb", "image", "region", "zone",
            "ssh_public_key", "ssh_private_key_file", "ssh_user", "admin_cidr", "spot", "vpc", "vpc_cidr", "storage"},
    "local": set(),
}
COMMON = {"cloud", "cluster", "gpu_nodes", "data_disk_gb", "tags"}
REQUIRED = {
    "ibm": ("flavor", "storage_flavor", "storage_disk_gb", "datacenter", "ssh_public_key", "admin_cidr"),
    "aws": ("flavor", "storage_flavor", "storage_disk_gb", "region", "ssh_public_key", "admin_cidr"),
    "local": (),
}


class ConfigError(TrainrigError):
    """A stack configuration error that names its key."""

    def __init__(self, key: str, problem: str, hint: str | None = None, namespaced: bool = True):
        hint = hint if hint is not None else HINTS.get(key, "")
        name = f"{NAMESPACE}:{key}" if namespaced else key
        super().__init__(f"{name}: {problem}" + (f"; {hint}" if hint else ""))
        self.key = key


class StackConfig(BaseModel):
    """One cluster as a stack describes it. Keys that do not apply to the chosen cloud are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cloud: str
    cluster: str = Field(pattern=CLUSTER_NAME.pattern)
    gpu_nodes: int = Field(ge=0, le=64)
    flavor: str | None = Field(default=None, description="IBM flavor or AWS instance type of the GPU nodes")
    gpus_per_node: int | None = Field(default=None, ge=0, description="derived from the flavor when omitted")
    data_disk_gb: int = Field(default=100, ge=1, le=16000)
    storage: Literal["nfs_server", "efs"] = Field(
        default="nfs_server", description="AWS: an NFS server instance with an EBS disk, or EFS (no server to run)")
    storage_flavor: str | None = None
    storage_disk_gb: int | None = Field(default=None, description="NFS disk size; with EFS, the GB the estimate assumes")
    image: str | None = Field(default=None, description="IBM OS code or private image (number or GUID); AWS AMI id (default: Deep Learning AMI lookup)")
    datacenter: str | None = Field(default=None, pattern=r"^[a-z]{3}[0-9]{2}$")
    region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    zone: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9][a-z]$")
    ssh_public_key: str | None = Field(default=None, pattern=SSH_PUBLIC_KEY)
    ssh_private_key_file: str = "~/.ssh/id_ed25519"
    ssh_user: str | None = None
    admin_cidr: IPv4Network | None = None
    spot: bool = False
    hourly: bool = True
    nic_speed: int = 1000
    private_vlan: int | None = None
    domain: str = Field(default="trainrig.example", pattern=r"^[a-z0-9.-]+\.[a-z]{2,}$")
    vpc: Literal["default", "new"] = "default"
    vpc_cidr: IPv4Network = IPv4Network("10.42.0.0/16")
    tags: dict[str, str] = {}
    sl_username: SecretStr | None = None
    sl_api_key: SecretStr | None = None

    @model_validator(mode="after")
    def _fits_the_cloud(self) -> StackConfig:
        if self.cloud not in CLOUDS:
            raise ConfigError("cloud", f"unknown cloud {self.cloud!r}")
        given = self.model_fields_set
        for key in sorted(given - COMMON - PER_CLOUD[self.cloud]):
            raise ConfigError(key, f"does not apply to cloud {self.cloud}", "remove it from the stack")
        efs = self.storage == "efs"
        if efs and self.storage_flavor is not None:
            raise ConfigError("storage_flavor", "does not apply with storage efs (EFS has no server)",
                              "remove it, or set trainrig:storage to nfs_server")
        for key in REQUIRED[self.cloud]:
            if getattr(self, key) is None and not (efs and key == "storage_flavor"):
                raise ConfigError(key, "missing")
        if self.cloud == "local":
            if self.data_disk_gb > 64:
                raise ConfigError("data_disk_gb", f"{self.data_disk_gb} is too big for a local node", "use 1-64")
            return self
        self._check_machines()
        if self.nic_speed not in (100, 1000, 10000):
            raise ConfigError("nic_speed", f"{self.nic_speed} Mbps is not offered", "use 100, 1000 or 10000")
        if self.admin_cidr.prefixlen == 0:
            raise ConfigError("admin_cidr", f"{self.admin_cidr} opens SSH to the whole internet")
        if self.storage_disk_gb < 1:
            raise ConfigError("storage_disk_gb", f"{self.storage_disk_gb} GB is not a disk")
        if self.zone and self.region and not self.zone.startswith(self.region):
            raise ConfigError("zone", f"{self.zone} is not in region {self.region}")
        return self

    def _check_machines(self) -> None:
        known = catalog.load().machines(self.cloud)
        word = "flavor" if self.cloud == "ibm" else "instance type"
        # EFS has no server, so no storage flavor to check.
        for key in ("flavor",) if self.storage == "efs" else ("flavor", "storage_flavor"):
            name = getattr(self, key)
            if name not in known:
                choices = sorted(k for k, m in known.items() if (m.gpus > 0) == (key == "flavor"))
                raise ConfigError(key, f"unknown {word} {name!r}", f"set trainrig:{key} to one of: {', '.join(choices)}")
        machine = known[self.flavor]
        if machine.gpus == 0:
            raise ConfigError("flavor", f"{self.flavor} has no GPU", f"choose a GPU {word} (see infra/prices.yaml)")
        if self.gpus_per_node is not None and self.gpus_per_node != machine.gpus:
            raise ConfigError("gpus_per_node", f"{self.flavor} has {machine.gpus} GPU(s), not {self.gpus_per_node}",
                              f"remove trainrig:gpus_per_node or choose a {word} with {self.gpus_per_node} GPUs")

    # -- derived -----------------------------------------------------------------------
    @property
    def gpus(self) -> int:
        if self.cloud == "local":
            return 0
        return catalog.load().machines(self.cloud)[self.flavor].gpus

    @property
    def login_user(self) -> str:
        return self.ssh_user or "root"

    @property
    def private_key_path(self) -> Path:
        return Path(os.path.expanduser(self.ssh_private_key_file))

    def gpu_node_names(self) -> list[str]:
        return [f"node{i}" for i in range(self.gpu_nodes)]


def validate(raw: Mapping[str, Any], source: str = "stack") -> StackConfig:
    """Raw `trainrig:*` values (namespace stripped) -> StackConfig, or a one-line ConfigError."""
    values = {k: _decode(v) for k, v in raw.items()}
    if "cloud" in values and values["cloud"] not in CLOUDS:
        raise ConfigError("cloud", f"unknown cloud {values['cloud']!r}")
    for key in ("cloud", "cluster", "gpu_nodes"):
        if key not in values:
            raise ConfigError(key, f"missing in {source}")
    try:
        return StackConfig.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "(top level)"
        problem = "unknown key" if first["type"] == "extra_forbidden" else f"{first['input']!r}: {first['msg']}"
        hint = "remove it from the stack" if first["type"] == "extra_forbidden" else None
        raise ConfigError(key, problem, hint) from None


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


def stack_file(stack: str, root: Path) -> Path:
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
    for key in ("sl_api_key", "sl_username"):
        value = config.get(f"{NAMESPACE}:{key}")
        if value is not None and not (isinstance(value, dict) and "secure" in value):
            raise ConfigError(key, "is stored in plain text", f"remove it and run: pulumi config set --secret {key} VALUE")
    return validate(_ours(config), source=str(path))


def from_pulumi_config(values: Mapping[str, Any]) -> StackConfig:
    """The engine's config map ({'trainrig:cloud': 'aws', ...}) -> StackConfig."""
    return validate(_ours(values), source="the stack config")


def _ours(config: Mapping[str, Any]) -> dict[str, Any]:
    prefix = f"{NAMESPACE}:"
    return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


def check_credentials(cfg: StackConfig, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse early, naming what to set, when the cloud's credentials are nowhere to be found."""
    home = Path(environ.get("HOME", "~")).expanduser()
    if cfg.cloud == "ibm":
        in_env = environ.get("SL_USERNAME") and environ.get("SL_API_KEY")
        in_stack = cfg.sl_username is not None and cfg.sl_api_key is not None
        if not (in_env or in_stack or (home / ".softlayer").is_file()):
            raise ConfigError("SL_USERNAME/SL_API_KEY", "IBM Cloud classic credentials are missing",
                              "export SL_USERNAME and SL_API_KEY, or: pulumi config set --secret sl_api_key KEY "
                              "(and sl_username)", namespaced=False)
    elif cfg.cloud == "aws":
        in_env = (environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY")) or environ.get("AWS_PROFILE")
        files = (home / ".aws" / "credentials", home / ".aws" / "config")
        if not (in_env or any(f.is_file() for f in files)):
            raise ConfigError("AWS_ACCESS_KEY_ID", "AWS credentials are missing",
                              "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run: aws configure",
                              namespaced=False)
