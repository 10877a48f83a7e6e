"""What a stack configuration will create and what it costs per hour, computed without the Pulumi CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from infra import catalog
from infra.config import StackConfig

STORAGE_NODE = "storage"
NFS_EXPORT = "/data"
DATA_DEVICE = {"ibm": "/dev/xvdc", "aws": "/dev/nvme1n1", "local": "/dev/xvdc"}
EBS_DEVICE_NAME = "/dev/sdf"  # what the EC2 API is told; Nitro instances show it as /dev/nvme1n1


@dataclass(frozen=True)
class PlannedNode:
    name: str
    role: str  # gpu / storage
    flavor: str
    gpus: int
    gpu_model: str | None
    cpus: int
    data_disk_gb: int | None
    machine_usd_per_hour: float
    disk_usd_per_hour: float

    @property
    def usd_per_hour(self) -> float:
        return self.machine_usd_per_hour + self.disk_usd_per_hour


@dataclass(frozen=True)
class Plan:
    config: StackConfig
    nodes: list[PlannedNode]
    shared_fs_usd_per_hour: float = 0.0  # EFS, billed per GB stored
    notes: list[str] = field(default_factory=list)

    @property
    def compute_usd_per_hour(self) -> float:
        return sum(n.usd_per_hour for n in self.nodes if n.role == "gpu")

    @property
    def storage_usd_per_hour(self) -> float:
        return sum(n.usd_per_hour for n in self.nodes if n.role == "storage") + self.shared_fs_usd_per_hour

    @property
    def total_usd_per_hour(self) -> float:
        return self.compute_usd_per_hour + self.storage_usd_per_hour

    def node(self, name: str) -> PlannedNode:
        return next(n for n in self.nodes if n.name == name)

    def hourly_cost(self) -> dict[str, float]:
        """The stack output `hourly_cost_usd`."""
        prices = catalog.load()
        return {
            "compute": round(self.compute_usd_per_hour, 4),
            "storage": round(self.storage_usd_per_hour, 4),
            "total": round(self.total_usd_per_hour, 4),
            "prices_as_of": str(prices.as_of),
            "prices_source": prices.source(self.config.cloud),
        }


def plan(cfg: StackConfig) -> Plan:
    prices = catalog.load()
    machines = prices.machines(cfg.cloud)
    nodes = []
    for name in cfg.gpu_node_names():
        machine = machines.get(cfg.flavor)
        nodes.append(_node(cfg, prices, name, "gpu", cfg.flavor or "container", machine, cfg.data_disk_gb))
    notes = []
    shared = 0.0
    if cfg.cloud == "local":
        nodes.append(_node(cfg, prices, STORAGE_NODE, "storage", "container", None, cfg.data_disk_gb))
        notes.append("local nodes are Docker containers on this machine: no GPUs, no charge")
    elif cfg.storage == "efs":
        shared = prices.shared_fs_usd_per_hour(cfg.storage_disk_gb)
        notes.append(f"EFS is billed per GB stored: priced here at {cfg.storage_disk_gb} GB (trainrig:storage_disk_gb)")
    else:
        nodes.append(_node(cfg, prices, STORAGE_NODE, "storage", cfg.storage_flavor, machines[cfg.storage_flavor],
                           cfg.storage_disk_gb))
    if cfg.spot:
        notes.append("spot instances: priced here at on-demand rates, the most they can cost")
    if cfg.cloud == "ibm" and not cfg.hourly:
        notes.append("monthly billing: priced here at the hourly rate")
    return Plan(cfg, nodes, shared, notes)


def _node(cfg, prices, name, role, flavor, machine: catalog.Machine | None, disk_gb: int | None) -> PlannedNode:
    return PlannedNode(
        name=name, role=role, flavor=flavor,
        gpus=machine.gpus if machine else 0, gpu_model=machine.gpu_model if machine else None,
        cpus=machine.cpus if machine else 1, data_disk_gb=disk_gb,
        machine_usd_per_hour=machine.usd_per_hour if machine else 0.0,
        disk_usd_per_hour=prices.disk_usd_per_hour(cfg.cloud, disk_gb or 0),
    )


def table(p: Plan):
    """The plan as a rich table: one row per node, then compute, storage and total $/hour."""
    from rich import box
    from rich.table import Table

    cfg = p.config
    where = cfg.datacenter or cfg.zone or cfg.region or "this machine"
    t = Table(title=f"stack plan: cluster {cfg.cluster} on {cfg.cloud} ({where})", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("node", "role", "flavor", "gpus", "cpus", "data disk", "$/hour"):
        t.add_column(column, justify="right" if column in ("cpus", "$/hour") else "left")
    for n in p.nodes:
        gpus = f"{n.gpus} x {n.gpu_model}" if n.gpus else "-"
        disk = f"{n.data_disk_gb} GB" if n.data_disk_gb else "-"
        t.add_row(n.name, n.role, n.flavor, gpus, str(n.cpus), disk, f"{n.usd_per_hour:.3f}")
    if p.shared_fs_usd_per_hour:
        t.add_row("efs", "storage", "EFS", "-", "-", f"{cfg.storage_disk_gb} GB", f"{p.shared_fs_usd_per_hour:.3f}")
    t.add_section()
    t.add_row("compute", "", "", "", "", "", f"{p.compute_usd_per_hour:.3f}")
    t.add_row("storage (kept by fab down)", "", "", "", "", "", f"{p.storage_usd_per_hour:.3f}")
    t.add_row("[bold]total[/]", "", "", "", "", "", f"[bold]{p.total_usd_per_hour:.3f}[/]")
    prices = catalog.load()
    t.caption = f"prices as of {prices.as_of}: {prices.source(cfg.cloud)}" + "".join(f"\n{note}" for note in p.notes)
    t.caption_justify = "left"
    return t
