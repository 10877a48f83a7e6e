"""What a cluster and its runs have cost so far, from the inventory's hourly prices and each node's uptime,
and the ledger of bills of clusters already torn down ($TRAINRIG_HOME/ledger.jsonl)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich import box
from rich.table import Table

from cluster import runs
from infra import catalog, ssh, state
from infra.inventory import Inventory, Node


@dataclass
class NodeCost:
    name: str
    role: str
    state: str  # up / parked / unreachable
    usd_per_hour: float
    parked_usd_per_hour: float | None
    hours: float | None  # since the node booted (None: it does not answer)

    @property
    def usd(self) -> float:
        return self.usd_per_hour * (self.hours or 0.0)


@dataclass
class Bill:
    cluster: str
    cloud: str
    nodes: list[NodeCost]
    retained_usd_per_hour: float = 0.0
    runs: list[tuple[str, str, float, float]] = field(default_factory=list)  # id, state, hours, usd

    @property
    def hours_up(self) -> float:
        return max((n.hours or 0.0 for n in self.nodes), default=0.0)

    @property
    def compute_usd(self) -> float:
        return sum(n.usd for n in self.nodes if n.role == "gpu")

    @property
    def storage_usd(self) -> float:
        return sum(n.usd for n in self.nodes if n.role != "gpu")

    def entry(self) -> dict:
        return {
            "cluster": self.cluster,
            "cloud": self.cloud,
            "torn_down_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "hours_up": round(self.hours_up, 4),
            "compute_usd": round(self.compute_usd, 4),
            "storage_usd": round(self.storage_usd, 4),
            "runs": [{"id": r[0], "state": r[1], "hours": round(r[2], 4), "usd": round(r[3], 4)} for r in self.runs],
        }


def _uptime_hours(inv: Inventory, node: Node) -> float | None:
    """How long the node has been up (PID 1's age: a VM's boot, a local node container's start)."""
    try:
        with ssh.open_checked(inv, node, timeout=5) as conn:
            out = ssh.run(conn, ["ps", "-o", "etimes=", "-p", "1"], timeout=15, check=False).stdout.strip()
        return int(out) / 3600 if out.isdigit() else None
    except Exception:  # whatever stops us reading a node (refused, bad key, gone), it counts no hours
        return None


def bill(inv: Inventory, with_runs: bool = True) -> Bill:
    uptimes = ssh.on_nodes(inv.nodes, lambda n: _uptime_hours(inv, n)) if inv.nodes else {}
    parked_nodes = {n.name for n in inv.gpu_nodes} if inv.parked_at else set()
    nodes = []
    for n in inv.nodes:
        hours = uptimes.get(n.name)
        node_state = "parked" if n.name in parked_nodes else ("up" if hours is not None else "unreachable")
        nodes.append(NodeCost(n.name, n.role, node_state, n.hourly_price_usd, n.parked_hourly_price_usd, hours))
    result = Bill(inv.cluster, inv.cloud, nodes, sum(r.hourly_price_usd for r in inv.retained))
    if with_runs:
        result.runs = run_costs(inv)
    return result


def run_usd_per_hour(inv: Inventory, record: runs.RunRecord) -> float:
    """The run's nodes × their hourly price (nodes already gone count at nothing: their price is not known)."""
    prices = {n.name: n.hourly_price_usd for n in inv.nodes}
    return sum(prices.get(name, 0.0) for name in record.nodes)


def run_costs(inv: Inventory) -> list[tuple[str, str, float, float]]:
    known = runs.records(inv.cluster)
    if not known or not inv.nodes:
        return []
    try:
        node = runs.reader_node(inv, known[-1])
        with ssh.open_checked(inv, node, timeout=5) as conn:
            sftp = conn.sftp()
            statuses = [(r, runs.read_status(sftp, r)) for r in known]
    except Exception:  # no node to read the runs from: the cluster's bill stands without them
        return []
    out = []
    for record, status in statuses:
        if not status or "started_at" not in status:
            continue
        hours = ((status.get("ended_at") or time.time()) - status["started_at"]) / 3600
        out.append((record.id, status.get("state", "?"), hours, hours * run_usd_per_hour(inv, record)))
    return out


# -- the ledger -------------------------------------------------------------------------------


def ledger_path() -> Path:
    return state.home() / "ledger.jsonl"


def record_bill(entry: dict) -> None:
    """Append a torn-down cluster's bill; the ledger only grows."""
    path = ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def ledger() -> list[dict]:
    path = ledger_path()
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- tables -----------------------------------------------------------------------------------


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def bill_table(b: Bill) -> Table:
    prices = catalog.load(b.cloud)
    t = Table(
        title=f"cluster {b.cluster} ({b.cloud}): up {b.hours_up:.2f} h",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("node", "role", "state", "$/h running", "$/h parked", "hours up", "$ so far"):
        t.add_column(column, justify="right" if column.startswith(("$", "hours")) else "left")
    for n in b.nodes:
        hours = "-" if n.hours is None else f"{n.hours:.2f}"
        t.add_row(n.name, n.role, n.state, _usd(n.usd_per_hour), _usd(n.parked_usd_per_hour), hours, _usd(n.usd))
    t.add_section()
    t.add_row("compute", "", "", "", "", "", _usd(b.compute_usd))
    t.add_row("storage", "", "", "", "", "", _usd(b.storage_usd))
    if b.retained_usd_per_hour:
        t.add_row("kept storage", "", "", _usd(b.retained_usd_per_hour), "", "", "")
    t.caption = (
        f"prices as of {prices.as_of}: {prices.source}; '-' parked: a stopped node bills in full, or cannot stop"
    )
    return t


def runs_table(b: Bill) -> Table:
    t = Table(title=f"runs on {b.cluster}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("run", "state", "hours", "$ (nodes × hours)"):
        t.add_column(column, justify="right" if column in ("hours", "$ (nodes × hours)") else "left")
    for run_id, run_state, hours, usd in b.runs:
        t.add_row(run_id, run_state, f"{hours:.2f}", _usd(usd))
    return t


def ledger_table(entries: list[dict]) -> Table:
    t = Table(title="ledger: clusters torn down", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("cluster", "cloud", "torn down", "hours up", "$ compute", "$ storage"):
        t.add_column(column, justify="right" if column.startswith(("$", "hours")) else "left")
    for e in entries:
        t.add_row(
            e["cluster"],
            e["cloud"],
            e["torn_down_at"],
            f"{e['hours_up']:.2f}",
            _usd(e["compute_usd"]),
            _usd(e["storage_usd"]),
        )
    total = sum(e["compute_usd"] + e["storage_usd"] for e in entries)
    t.caption = f"total ${total:,.2f}"
    return t
