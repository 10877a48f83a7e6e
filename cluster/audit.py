"""What still bills, cloud by cloud, and whether an inventory accounts for it (`fab audit`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich import box
from rich.table import Table

from infra import clouds, inventory, state
from infra.clouds import Billable
from infra.errors import TrainrigError
from infra.inventory import Inventory


@dataclass
class Report:
    found: list[tuple[str, Billable, bool]] = field(default_factory=list)  # cloud, item, accounted for
    unchecked: list[str] = field(default_factory=list)  # "cloud: why"

    @property
    def unaccounted(self) -> list[tuple[str, Billable]]:
        return [(cloud, item) for cloud, item, ok in self.found if not ok]


def audit(everything: bool) -> Report:
    """Every cloud that holds a known cluster (every registered cloud with `everything`), by tag or label."""
    known: dict[str, Inventory] = {name: inventory.load(name) for name in state.known_clusters()}
    report = Report()
    for cloud in clouds.all_clouds():
        mine = {name: inv for name, inv in known.items() if inv.cloud == cloud.name}
        if not mine and not everything:
            continue
        try:
            items = cloud.audit(mine, everything)
        except TrainrigError as exc:
            if mine:  # a cluster we know of that cannot be checked is not known to be clean
                raise
            report.unchecked.append(f"{cloud.name}: {exc}")
            continue
        report.found += [(cloud.name, item, item.accounted_for(known)) for item in items]
    return report


def table(report: Report) -> Table:
    t = Table(title="billable resources of trainrig clusters", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("cloud", "cluster", "kind", "id", "node", "detail", "accounted for"):
        t.add_column(column)
    for cloud, item, ok in report.found:
        verdict = "[green]yes[/]" if ok else "[red]NO[/]"
        t.add_row(cloud, item.cluster or "-", item.kind, item.id, item.node or "-", item.detail, verdict)
    return t
