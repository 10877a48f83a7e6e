"""Follow a run live (step, loss, samples/s, elapsed) and print or follow its log."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field

import paramiko
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from cluster import cost, runs
from cluster.runs import FINAL_STATES, RunRecord
from infra import ssh, ui
from infra.errors import TrainrigError
from infra.inventory import Inventory

SPARK = "▁▂▃▄▅▆▇█"
RECORD_FIELDS = {"step", "loss", "throughput", "time"}  # in every metrics record; any other key is the job's own
ETA_WINDOW = 20  # logged steps the pace is taken over: recent enough to follow a change of speed
UNIT_CHECK_EVERY = 5.0


@dataclass
class RunView:
    """What we know of a run so far, built from its metrics.jsonl and status.json."""

    record: RunRecord
    metrics: list[dict] = field(default_factory=list)
    status: dict | None = None
    partial: bytes = b""
    hosts: dict[str, dict] = field(default_factory=dict)  # each node's latest telemetry sample
    telemetry_offsets: dict[str, int] = field(default_factory=dict)
    usd_per_hour: float = 0.0  # the run's nodes at the inventory's prices

    @property
    def usd(self) -> float:
        return self.usd_per_hour * self.elapsed / 3600

    # Clocks are never mixed: a node's times are compared with the same node's, and the operator's
    # monotonic clock measures only what happened here (when a sample or a heartbeat came in).
    sample_seen: dict[str, float] = field(default_factory=dict)  # host -> monotonic arrival of its sample
    beat_seen: tuple[float, float] | None = None  # (node's heartbeat_at, monotonic when we first saw it)

    def feed_telemetry(self, host: str, chunk: bytes) -> None:
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.telemetry_offsets[host] = self.telemetry_offsets.get(host, 0) + len(complete)
        for line in complete.splitlines():
            try:
                self.hosts[host] = json.loads(line)
            except ValueError:
                continue  # a line being written as we read: the next sample will do
            self.sample_seen[host] = time.monotonic()

    def feed(self, chunk: bytes) -> list[dict]:
        data = self.partial + chunk
        *lines, self.partial = data.split(b"\n")
        new = [m for m in map(runs.parse_metric, lines) if m is not None]
        self.metrics += new
        return new

    @property
    def state(self) -> str:
        return (self.status or {}).get("state", "starting")

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def elapsed(self) -> float:
        """The run's age on its node's clock, plus how long ago (on ours) the node last said it was alive.

        The operator's wall clock minus the node's start time would be off by the clocks' skew
        (a node ahead by years gave a negative age of millions of seconds).
        """
        if not self.status:
            return 0.0
        started = self.status["started_at"]
        if self.status.get("ended_at"):
            return max(0.0, self.status["ended_at"] - started)
        beat = self.status.get("heartbeat_at") or started
        if self.beat_seen is None or self.beat_seen[0] != beat:
            self.beat_seen = (beat, time.monotonic())
        return max(0.0, beat - started + time.monotonic() - self.beat_seen[1])

    def sample_ages(self) -> dict[str, float]:
        """Seconds since each host's latest sample came in (our clock only)."""
        now = time.monotonic()
        return {host: now - seen for host, seen in self.sample_seen.items()}

    @property
    def last(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    @property
    def reason(self) -> str | None:
        """Why the run ended as it did (failed, cancelled), from the supervisor."""
        return (self.status or {}).get("reason")

    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics if "loss" in m]

    def own_metrics(self) -> dict[str, tuple[float, int]]:
        """The job's own metrics (BLEU, top-1...): each one's latest value and the step it belongs to."""
        latest: dict[str, tuple[float, int]] = {}
        for m in self.metrics:
            for name, value in m.items():
                if name not in RECORD_FIELDS:
                    latest[name] = (value, m["step"])
        return latest

    def eta(self) -> float | None:
        """Seconds left at the pace of the last ETA_WINDOW logged steps; None before there is a pace or a goal."""
        total = self.record.max_steps
        timed = [m for m in self.metrics if "time" in m][-ETA_WINDOW:]
        if not total or self.finished or len(timed) < 2:
            return None
        steps, seconds = timed[-1]["step"] - timed[0]["step"], timed[-1]["time"] - timed[0]["time"]
        if steps <= 0 or seconds <= 0:
            return None
        return max(total - timed[-1]["step"], 0) * seconds / steps


def sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    sample = values[::step][-width:]
    low, high = min(sample), max(sample)
    span = (high - low) or 1.0
    return "".join(SPARK[int((v - low) / span * (len(SPARK) - 1))] for v in sample)


def render(view: RunView) -> Table:
    last = view.last
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    color = {"succeeded": "green", "failed": "red", "stalled": "red", "cancelled": "yellow"}.get(view.state, "cyan")
    table.add_row("run", f"{view.record.id}  [{color}]{view.state}[/]  ({view.record.ranks} ranks)")
    if view.reason and view.state != "succeeded":
        table.add_row("cause", escape(view.reason))
    step, total = last.get("step", 0), view.record.max_steps
    if total:
        table.add_row("step", ProgressBar(total=total, completed=min(step, total), width=40))
        table.add_row("", f"{step}/{total}")
    else:
        table.add_row("step", str(step))
    losses = view.losses()
    if losses:
        table.add_row("loss", f"{losses[-1]:.4f}  (first {losses[0]:.4f}, min {min(losses):.4f})  {sparkline(losses)}")
    if "throughput" in last:
        table.add_row("samples/s", f"{last['throughput']:,.1f}")
    for name, (value, at) in view.own_metrics().items():
        table.add_row(escape(name), f"{value:.4g}  (step {at})")
    table.add_row("elapsed", f"{view.elapsed:.1f}s")
    eta = view.eta()
    if eta is not None:
        table.add_row("ETA", duration(eta))
    table.add_row("cost", f"${view.usd:,.2f} so far (${view.usd_per_hour:,.2f}/h for {len(view.record.nodes)} nodes)")
    warning = stall_warning(view)
    if warning:
        table.add_row("[yellow]stall?[/]", warning)
    if view.hosts:
        table.add_row("hosts", host_table(view.hosts, view.sample_ages()))
        table.add_row("network", network_verdict(view.hosts))
    return table


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def stall_warning(view: RunView) -> str | None:
    """A warning once half the stall timeout has passed without a new step (both times on the node's clock)."""
    status = view.status or {}
    timeout, beat = status.get("stall_timeout"), status.get("heartbeat_at")
    if view.finished or not timeout or not beat or not view.metrics:
        return None
    quiet = beat - (status["started_at"] + view.metrics[-1].get("time", 0.0))
    if quiet < timeout / 2:
        return None
    return f"no new step for {quiet:.0f}s; the run is stopped as stalled at {timeout:.0f}s"


# The verdict on the question every scale-out raises: is the network the bottleneck? Each link is
# full duplex, so the busier direction is what fills it. A NIC above NETWORK_BOUND of its link
# speed while the GPUs wait (below GPU_WAITING on average, or no GPUs to tell) says the network is
# what limits the step time; below NETWORK_IDLE of the link it is not. In between the network is
# busy without being shown to be the limit.
NETWORK_BOUND, NETWORK_IDLE, GPU_WAITING = 0.7, 0.3, 80.0


def network_verdict(hosts: dict[str, dict]) -> str:
    loads = []
    for host, s in hosts.items():
        if s.get("link_mbps"):
            busiest = max(s.get("nic_in_mbs", 0.0), s.get("nic_out_mbs", 0.0))
            loads.append((busiest / (s["link_mbps"] / 8), host, s))
    if not loads:
        return "no link speed reported: cannot tell"
    share, host, s = max(loads)
    gpus = s.get("gpus") or []
    gpu = sum(g["util"] for g in gpus) / len(gpus) if gpus else None
    waiting = gpu is None or gpu < GPU_WAITING
    if share >= NETWORK_BOUND and waiting:
        where = f"GPUs at {gpu:.0f}%" if gpu is not None else "no GPU to tell"
        return f"[red]network-bound[/]: {host} uses {share:.0%} of its link ({where})"
    if share < NETWORK_IDLE:
        return f"not the bottleneck: at most {share:.0%} of a link ({host})"
    return f"busy, not shown to be the limit: {host} at {share:.0%} of its link"


def host_table(hosts: dict[str, dict], ages: dict[str, float]) -> Table:
    """One row per node: GPU use and memory, CPU, memory, NIC MB/s, and how long ago its sample came in."""
    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("host", "GPU %", "GPU mem", "CPU %", "mem %", "NIC in MB/s", "NIC out MB/s", "age"):
        table.add_column(column, justify="left" if column == "host" else "right")
    for host, s in sorted(hosts.items()):
        gpus = s.get("gpus") or []
        util = " ".join(f"{g['util']:.0f}" for g in gpus) or "no GPU"
        memory = " ".join(f"{g['mem_used_mb'] / max(g['mem_total_mb'], 1) * 100:.0f}%" for g in gpus) or "-"
        table.add_row(
            host,
            util,
            memory,
            f"{s.get('cpu', 0):.0f}",
            f"{s.get('mem') or 0:.0f}",
            f"{s.get('nic_in_mbs', 0):.2f}",
            f"{s.get('nic_out_mbs', 0):.2f}",
            f"{ages[host]:.0f}s" if host in ages else "-",
        )
    return table


def plain_line(view: RunView, metric: dict) -> str:
    total = f"/{view.record.max_steps}" if view.record.max_steps else ""
    parts = [f"step {metric['step']}{total}"]
    if "loss" in metric:
        parts.append(f"loss {metric['loss']:.4f}")
    if "throughput" in metric:
        parts.append(f"samples/s {metric['throughput']:,.1f}")
    parts += [f"{name} {value:.4g}" for name, value in metric.items() if name not in RECORD_FIELDS]
    return f"[{metric.get('time', view.elapsed):6.1f}s] " + "  ".join(parts)


def monitor(inv: Inventory, record: RunRecord, *, interval: float = 1.0, timeout: float | None = None) -> RunView:
    """Poll the run until it ends (or timeout passes); live view on a terminal, lines otherwise."""
    view = RunView(record, usd_per_hour=cost.run_usd_per_hour(inv, record))
    node = runs.reader_node(inv, record)
    deadline = time.monotonic() + timeout if timeout else None
    with ssh.open_checked(inv, node) as conn, _answering(node, record):
        sftp = ssh.watched(conn, node)
        offset, last_unit_check = 0, time.monotonic()
        live = Live(render(view), console=ui.console, refresh_per_second=4) if ui.console.is_terminal else None
        with live or contextlib.nullcontext():
            while True:
                chunk = runs.read_from(sftp, f"{record.run_dir}/metrics.jsonl", offset)
                offset += len(chunk)
                new = view.feed(chunk)
                if live:
                    read_telemetry(view, sftp)
                view.status = runs.read_status(sftp, record) or view.status
                if live:
                    live.update(render(view))
                else:
                    for metric in new:
                        ui.console.print(plain_line(view, metric))
                if view.finished:
                    break
                if time.monotonic() - last_unit_check > UNIT_CHECK_EVERY and node.name == record.node:
                    last_unit_check = time.monotonic()
                    if _vanished(conn, record, sftp):
                        view.status = {
                            **(view.status or {"started_at": time.time()}),
                            "state": "failed",
                            "reason": "the run's supervisor stopped without reporting",
                        }
                        break
                if deadline and time.monotonic() > deadline:
                    raise TrainrigError(f"run {record.id} still {view.state} after {timeout:.0f}s (it keeps running)")
                time.sleep(interval)
    return view


def read_telemetry(view: RunView, sftp) -> None:
    """Each node's new telemetry lines since the last read; the latest sample per host is what the rows show."""
    for host in view.record.nodes:
        path = f"{view.record.run_dir}/telemetry/{host}.jsonl"
        view.feed_telemetry(host, runs.read_from(sftp, path, view.telemetry_offsets.get(host, 0)))


@contextlib.contextmanager
def _answering(node, record: RunRecord):
    """A node that stops answering while we watch is one line, never a hang or a traceback."""
    try:
        yield
    except (TimeoutError, OSError, paramiko.SSHException, EOFError) as exc:
        raise TrainrigError(
            f"{node.name} stopped answering at {time.strftime('%H:%M:%S')} while reading run {record.id} "
            f"({type(exc).__name__}); the run is watched on the cluster and goes on: fab monitor --run {record.id}"
        ) from None


def _vanished(conn, record: RunRecord, sftp) -> bool:
    active = ssh.run(conn, ["systemctl", "is-active", "--quiet", record.unit], check=False).exited == 0
    # Re-read status: the unit may have finished between our two looks.
    return not active and (runs.read_status(sftp, record) or {}).get("state") not in FINAL_STATES


def logs(inv: Inventory, record: RunRecord, *, follow: bool = False, interval: float = 1.0, out=None) -> None:
    """Print the run's log; with follow, keep printing new lines until the run ends."""
    out = out or sys.stdout
    node = runs.reader_node(inv, record)
    with ssh.open_checked(inv, node) as conn, _answering(node, record):
        sftp = ssh.watched(conn, node)
        offset = 0
        while True:
            status = runs.read_status(sftp, record)
            chunk = runs.read_from(sftp, f"{record.run_dir}/train.log", offset)
            offset += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
            if not follow or (status or {}).get("state") in FINAL_STATES:
                if follow:
                    # One last read: lines written between the status read and the log read.
                    out.write(runs.read_from(sftp, f"{record.run_dir}/train.log", offset).decode(errors="replace"))
                return
            time.sleep(interval)
