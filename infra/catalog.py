"""Each cloud's dated price table (infra/clouds/<cloud>/prices.yaml): GPUs, CPUs and $/hour of every machine we know."""

from __future__ import annotations

import functools
from datetime import date
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from infra.errors import TrainrigError
from infra.models import Strict, first_error

CLOUDS_DIR = Path(__file__).with_name("clouds")


class Machine(Strict):
    gpus: int = Field(ge=0)
    gpu_model: str | None = None
    cpus: int = Field(ge=1)
    memory_gb: int = Field(ge=1)
    usd_per_hour: float = Field(ge=0)


class Prices(Strict):
    """One cloud's table; a cloud without machines to choose (local) has none."""

    as_of: date
    currency: str
    hours_per_month: int = Field(gt=0)
    source: str
    region: str | None = Field(default=None, description="where the prices were read, when they vary by region")
    disk_usd_per_gb_month: float = Field(default=0.0, ge=0)
    shared_fs_usd_per_gb_month: float = Field(default=0.0, ge=0, description="a managed file system such as EFS")
    root_disk_gb: int = Field(default=0, ge=0, description="each node's root volume, billed apart from the machine")
    machines: dict[str, Machine] = {}
    regions: dict[str, dict[str, float]] = Field(
        default={}, description="$/hour of a machine in a region where it differs from `region`'s"
    )
    can_park: bool = Field(default=False, description="a stopped node's machine stops billing (its disks do not)")

    def machine_usd_per_hour(self, flavor: str, where: str | None = None) -> float:
        """A machine's $/hour in a region (the table's own region unless `regions` says otherwise)."""
        return self.regions.get(where or "", {}).get(flavor, self.machines[flavor].usd_per_hour)

    def disk_usd_per_hour(self, size_gb: int) -> float:
        return size_gb * self.disk_usd_per_gb_month / self.hours_per_month

    def shared_fs_usd_per_hour(self, size_gb: int) -> float:
        return size_gb * self.shared_fs_usd_per_gb_month / self.hours_per_month


@functools.cache
def load(cloud: str) -> Prices:
    path = CLOUDS_DIR / cloud / "prices.yaml"
    try:
        return Prices.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise TrainrigError(f"cloud {cloud!r} has no price table: add {path}") from None
    except ValidationError as exc:
        raise TrainrigError(f"price table {path}: {first_error(exc)}") from None
