"""The dated price table (infra/prices.yaml): GPUs, CPUs and $/hour of every flavor and instance type we know."""

from __future__ import annotations

import functools
from datetime import date
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

PRICES_FILE = Path(__file__).with_name("prices.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Machine(Strict):
    gpus: int = Field(ge=0)
    gpu_model: str | None = None
    cpus: int = Field(ge=1)
    memory_gb: int = Field(ge=1)
    usd_per_hour: float = Field(ge=0)


class IbmPrices(Strict):
    source: str
    san_disk_usd_per_gb_month: float
    flavors: dict[str, Machine]


class AwsPrices(Strict):
    source: str
    region: str
    ebs_gp3_usd_per_gb_month: float
    efs_standard_usd_per_gb_month: float
    instance_types: dict[str, Machine]


class LocalPrices(Strict):
    source: str


class PriceTable(Strict):
    as_of: date
    currency: str
    hours_per_month: int
    ibm: IbmPrices
    aws: AwsPrices
    local: LocalPrices

    def machines(self, cloud: str) -> dict[str, Machine]:
        """The flavors (IBM) or instance types (AWS) of a cloud; none for local."""
        return {"ibm": self.ibm.flavors, "aws": self.aws.instance_types}.get(cloud, {})

    def disk_usd_per_hour(self, cloud: str, size_gb: int) -> float:
        per_gb_month = {"ibm": self.ibm.san_disk_usd_per_gb_month, "aws": self.aws.ebs_gp3_usd_per_gb_month}.get(cloud, 0.0)
        return size_gb * per_gb_month / self.hours_per_month

    def shared_fs_usd_per_hour(self, size_gb: int) -> float:
        return size_gb * self.aws.efs_standard_usd_per_gb_month / self.hours_per_month

    def source(self, cloud: str) -> str:
        return getattr(self, cloud).source


@functools.cache
def load(path: Path = PRICES_FILE) -> PriceTable:
    return PriceTable.model_validate(yaml.safe_load(path.read_text()))
