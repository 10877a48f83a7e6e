"""What a stack configuration will create and what it costs per hour, without the Pulumi CLI (`fab plan` prints it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from infra import catalog
from infra.config import StackConfig
from infra.inventory import STORAGE_NODE

NFS_EXPORT = "/data"


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
    disk_usd_per_hour: float  # the data disk and the root volume
    can_park: bool = False
    parked_machine_usd_per_hour: float = 0.0  # what a parked node's machine still bills (IBM: its park flavor)
    spot: bool = False  # its price is the on-demand one, the most a spot instance can cost

    @property
    def usd_per_hour(self) -> float:
        return self.machine_usd_per_hour + self.disk_usd_per_hour

    @property
    def parked_usd_per_hour(self) -> float | None:
        """Parked: the disks bill, and the machine it parks as, if any (None where a stopped node bills in full)."""
        return self.disk_usd_per_hour + self.parked_machine_usd_per_hour if self.can_park else None


@dataclass(frozen=True)
class Blueprint:
    config: StackConfig
    nodes: list[PlannedNode]
    shared_fs_usd_per_hour: float = 0.0  # a managed file system (EFS), billed per GB stored
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

    def hourly_cost(self) -> dict[str, float | str]:
        """The stack output `hourly_cost_usd`."""
        prices = self.config.prices
        return {
            "compute": round(self.compute_usd_per_hour, 4),
            "storage": round(self.storage_usd_per_hour, 4),
            "total": round(self.total_usd_per_hour, 4),
            "prices_as_of": str(prices.as_of),
            "prices_source": prices.source,
        }


def blueprint(cfg: StackConfig) -> Blueprint:
    prices = cfg.prices
    nodes = [
        _node(cfg, name, "gpu", getattr(cfg, "flavor", None), cfg.machine, cfg.data_disk_gb)
        for name in cfg.gpu_node_names()
    ]
    shared = 0.0
    if cfg.shared_fs:
        shared = prices.shared_fs_usd_per_hour(cfg.storage_size_gb)
    else:
        nodes.append(
            _node(
                cfg,
                STORAGE_NODE,
                "storage",
                getattr(cfg, "storage_flavor", None),
                cfg.storage_machine,
                cfg.storage_size_gb,
            )
        )
    return Blueprint(cfg, nodes, shared, cfg.notes())


def _node(
    cfg: StackConfig, name: str, role: str, flavor: str | None, machine: catalog.Machine | None, disk_gb: int
) -> PlannedNode:
    return PlannedNode(
        name=name,
        role=role,
        flavor=flavor or "container",
        gpus=machine.gpus if machine else 0,
        gpu_model=machine.gpu_model if machine else None,
        cpus=machine.cpus if machine else 1,
        data_disk_gb=disk_gb,
        machine_usd_per_hour=cfg.prices.machine_usd_per_hour(flavor, cfg.where) if machine and flavor else 0.0,
        disk_usd_per_hour=cfg.prices.disk_usd_per_hour(disk_gb + cfg.prices.root_disk_gb),
        can_park=cfg.prices.can_park and not (role == "gpu" and getattr(cfg, "spot", False)),
        parked_machine_usd_per_hour=_parked_machine(cfg) if role == "gpu" else 0.0,
        spot=role == "gpu" and getattr(cfg, "spot", False),
    )


def _parked_machine(cfg: StackConfig) -> float:
    """$/hour of the machine a parked GPU node runs as: IBM parks by a flavor change; elsewhere a stopped
    machine bills nothing."""
    park = getattr(cfg, "park_machine", None)
    return cfg.prices.machine_usd_per_hour(park, cfg.where) if park else 0.0


def table(bp: Blueprint):
    """The blueprint as a rich table: one row per node, then compute, storage and total $/hour."""
    from rich import box
    from rich.table import Table

    cfg = bp.config
    t = Table(
        title=f"stack plan: cluster {cfg.cluster} on {cfg.cloud} ({cfg.where})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("node", "role", "flavor", "gpus", "cpus", "data disk", "$/hour"):
        t.add_column(column, justify="right" if column in ("cpus", "$/hour") else "left")
    for n in bp.nodes:
        gpus = f"{n.gpus} x {n.gpu_model}" if n.gpus else "-"
        disk = f"{n.data_disk_gb} GB" if n.data_disk_gb else "-"
        t.add_row(n.name, n.role, n.flavor, gpus, str(n.cpus), disk, f"{n.usd_per_hour:.3f}")
    if bp.shared_fs_usd_per_hour:
        t.add_row("efs", "storage", "EFS", "-", "-", f"{cfg.storage_size_gb} GB", f"{bp.shared_fs_usd_per_hour:.3f}")
    t.add_section()
    t.add_row("compute", "", "", "", "", "", f"{bp.compute_usd_per_hour:.3f}")
    t.add_row("storage (kept by fab down)", "", "", "", "", "", f"{bp.storage_usd_per_hour:.3f}")
    t.add_row("[bold]total[/]", "", "", "", "", "", f"[bold]{bp.total_usd_per_hour:.3f}[/]")
    t.caption = f"prices as of {cfg.prices.as_of}: {cfg.prices.source}" + "".join(f"\n{note}" for note in bp.notes)
    t.caption_justify = "left"
    return t
