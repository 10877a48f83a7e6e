"""The local cloud: Docker containers that behave like VMs (systemd, sshd, a data disk, shared storage), free."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from infra.config import ConfigError, StackBase
from infra.errors import TrainrigError


class LocalConfig(StackBase):
    hints: ClassVar[dict[str, str]] = {**StackBase.hints, "data_disk_gb": "use 1-64"}

    cloud: Literal["local"]
    data_disk_gb: int = Field(default=2, ge=1, le=16000)

    @model_validator(mode="after")
    def _fits_this_machine(self) -> LocalConfig:
        if self.data_disk_gb > 64:
            raise ConfigError("data_disk_gb", f"{self.data_disk_gb} is too big for a local node", "use 1-64")
        return self

    def notes(self) -> list[str]:
        return ["local nodes are Docker containers on this machine: no GPUs, no charge"]


class LocalCloud:
    name = "local"
    Config = LocalConfig
    capabilities = frozenset({"create", "data_disk", "shared_storage", "ssh_mesh", "self_teardown", "park"})

    def build(self, parent, name, cfg, blueprint):
        from infra.clouds.local import program

        return program.build(parent, name, cfg, blueprint)

    def backend(self, stack=None):
        from infra.clouds.local.instance import BACKEND

        return BACKEND

    def stand_in_image(self, reference: str) -> str | None:
        """Local nodes reach no public registry: Debian's base comes from this machine, made offline."""
        if reference.startswith("debian:bookworm"):
            from infra.clouds.local import image

            return image.ensure_job_base()
        return None

    def billable(self, cluster: str, cfg=None) -> list[str]:
        return self.backend().billable(cluster)

    def audit(self, known, everything: bool):
        """Containers, volumes and networks by their trainrig.cluster label; loop devices by their disk file."""
        return self.backend().audit(set(known), everything)

    def power(self, inv, cfg=None, on: bool = True) -> dict[str, str]:
        """Stop or start the GPU node containers; their loop devices, volume and images stay."""
        return self.backend().power(inv.cluster, on)

    def capture(self, cluster: str, cfg, node: str, name: str) -> str:
        # Local nodes are baked by LocalBackend.bake, which generalizes the image as it builds it.
        raise TrainrigError(f"local nodes are baked with: fab bake --name {cluster} --node {node}")

    def verify(self, cfg, blueprint):
        from infra.clouds import Findings

        return Findings(notes=["local clusters order nothing from a cloud: nothing to verify"])


CLOUD = LocalCloud()
