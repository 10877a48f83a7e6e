"""The `fab` tasks: each parses its flags, loads the inventory, calls one library function, prints."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.markup import escape

from cluster import audit as audit_mod
from cluster import bake as bake_mod
from cluster import cost as cost_mod
from cluster import deadman as deadman_mod
from cluster import demo as demo_mod
from cluster import jobs, lifecycle, results, runs
from cluster import monitor as monitor_mod
from cluster import plot as plot_mod
from cluster import provision as provision_mod
from cluster import scaling as scaling_mod
from cluster import tensorboard as tensorboard_mod
from infra import clouds, state, ui
from infra import inventory as inventory_mod
from infra.errors import TrainrigError

NAME_HELP = "cluster name (default: trainrig.cluster in Fabric config, 'dev')"
INVENTORY_HELP = (
    "where the inventory comes from: 'stack:NAME' (a Pulumi stack's outputs; 'stack' alone: "
    "trainrig.stack), or a saved file "
    "(default: trainrig.inventory, else the cluster's own)"
)


def friendly(body):
    """User errors become one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(body)
    def wrapper(c, *args, **kwargs):
        try:
            return body(c, *args, **kwargs)
        except TrainrigError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


def _whole(flag: str, value, low: int, high: int | None = None) -> int:
    """A flag's whole number within bounds, or a one-line error naming the flag."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < low or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise TrainrigError(f"--{flag} {value!r}: give a whole number {bounds}")
    return number


def _name(c, name: str | None) -> str:
    """--name, else trainrig.cluster; an empty name is refused, never read as the default cluster."""
    chosen = c.config.trainrig.cluster if name is None else name
    if not chosen or not state.CLUSTER_NAME.match(chosen):
        flag = "--name" if name is not None else "trainrig.cluster"
        raise TrainrigError(
            f"{flag} {chosen!r}: give a cluster name of 1-31 lowercase letters, digits or '-', starting with a letter"
        )
    return chosen


def _count(value, flag: str, default: int) -> int:
    """A count flag as an int, or one line naming the flag (the range is the library's to check)."""
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TrainrigError(f"{flag} {value!r}: give a whole number, e.g. {flag} {default}") from None


def _seconds(value, flag: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise TrainrigError(f"{flag} {value!r}: give a number of seconds above 0, e.g. {flag} 600")
    return seconds


def _grace(down_after: bool, grace) -> float | None:
    """--down-after's grace in seconds (None: no --down-after), refused in one line before anything starts."""
    if grace is not None and not down_after:
        raise TrainrigError("--grace goes with --down-after")
    return deadman_mod.parse_duration(grace or "0s", "--grace") if down_after else None


def _ask(prompt: str) -> str:
    try:
        return ui.console.input(escape(prompt))
    except EOFError:
        return ""


def _inventory(c, name: str | None, inventory: str | None = None):
    cfg = c.config.trainrig
    if name is not None:
        _name(c, name)
    return inventory_mod.for_task(name, cfg.cluster, inventory or cfg.inventory, cfg.stack)


@task(
    help={
        "name": NAME_HELP,
        "nodes": "number of GPU-role nodes (default 2)",
        "disk_gb": "data disk size per node, GB",
        "image": "start the GPU nodes from this baked node image (fab bake)",
        "storage_image": "start the storage node from this baked image (fab bake)",
        "on_idle": "what the dead-man switch does to the GPU nodes: down (default: removes them) or park (stops them)",
    },
    # Long flags only: with -n and -o taken, invoke's next pick for --on-idle is "-_", shown as "--=".
    auto_shortflags=False,
)
@friendly
def up(c, name=None, nodes=None, disk_gb=None, image=None, on_idle=None, storage_image=None):
    """Create a local cluster (N GPU-role nodes and a storage node as Docker "VMs"); bring back a parked one, or
    the stopped or restarted nodes of one that is up."""
    cfg = c.config.trainrig
    cluster = _name(c, name)
    count = _count(nodes, "--nodes", cfg.nodes)
    if nodes is None:  # a cluster that is up keeps its size; --nodes that differs is refused
        count = lifecycle.running_gpu_nodes(cluster) or count
    disk = _count(disk_gb, "--disk-gb", cfg.data_disk_gb)
    inv = lifecycle.up(cluster, count, disk, image=image, on_idle=on_idle, storage_image=storage_image)
    ui.console.print(lifecycle.status_table(inv))
    ui.console.print(f"inventory: {inventory_mod.path_for(inv.cluster)}")


@task(help={"name": NAME_HELP, "inventory": INVENTORY_HELP})
@friendly
def status(c, name=None, inventory=None):
    """Show the cluster's nodes, addresses and whether each answers SSH."""
    inv = deadman_mod.settle(_inventory(c, name, inventory))
    ui.console.print(lifecycle.status_table(inv))
    if not inv.running:
        ui.console.print(f"no nodes running; start them with: fab up --name {inv.cluster}")
        return
    record = deadman_mod.teardown_record(inv)
    if inv.parked_at:
        ui.console.print(
            f"parked since {inv.parked_at:%Y-%m-%d %H:%M:%S} UTC: GPU nodes stopped, disks kept; "
            f"bring it back with: fab up --name {inv.cluster}"
        )
        if deadman_mod.parked_by_switch(record):
            ui.console.print(escape(deadman_mod.describe_record(record)))
        return
    if record:
        ui.console.print(escape(deadman_mod.describe_record(record)))
    armed = deadman_mod.saved(inv.cluster)
    if armed.armed and not record:
        ui.console.print(escape(deadman_mod.summary(inv, armed)))


@task(
    help={
        "name": NAME_HELP,
        "tags": "run only these playbook tags (e.g. ssh_mesh)",
        "retry_failed": "re-run only the hosts that failed or were unreachable last time",
        "playbook": "playbook under playbooks/ (default site.yml)",
        "inventory": INVENTORY_HELP,
        "force": "run every phase on every node, even those whose inputs have not changed since they last succeeded",
        "check_drift": "change nothing: run every task in check mode, list what differs on the nodes (exit 1 if any)",
    }
)
@friendly
def provision(
    c, name=None, tags=None, retry_failed=False, playbook="site.yml", inventory=None, force=False, check_drift=False
):
    """Run the Ansible playbooks on every node in parallel, only the phases each node needs, with a per-host recap."""
    inv = _inventory(c, name, inventory)
    if check_drift:
        drift = provision_mod.check_drift(inv)
        if drift:
            hosts = ", ".join(f"{host} ({len(tasks)} tasks)" for host, tasks in drift.items())
            raise TrainrigError(
                f"drift on {hosts}; put it back with: fab provision --name {inv.cluster} --force", exit_code=1
            )
        return
    provision_mod.provision(inv, playbook=playbook, tags=tags, retry_failed=retry_failed, force=force)


@task(
    help={
        "job": "job spec, e.g. training_jobs/dp-mlp.yaml",
        "name": NAME_HELP,
        "follow": "monitor the run until it ends (exit status = the run's)",
        "inventory": INVENTORY_HELP,
        "resume": "continue from the last checkpoint of this run (id or prefix), as a new run that records it",
        "down_after": "when the run ends, however it ends, the cluster ends its GPU nodes (IBM: cancels them); "
        "storage stays",
        "grace": "with --down-after: wait this long after the run ends first (90s, 5m, 2h; default 0s)",
    }
)
@friendly
def train(c, job, name=None, follow=False, inventory=None, resume=None, down_after=False, grace=None):
    """Launch a training job across the cluster, detached; prints the run id."""
    spec = jobs.load(job)
    grace_s = _grace(down_after, grace)
    inv = inventory_mod.require_running(deadman_mod.settle(_inventory(c, name, inventory)))
    earlier = runs.find(inv.cluster, resume) if resume else None
    record, armed = deadman_mod.launch_run(inv, spec, resume=earlier, down_after=grace_s)
    ui.console.print(f"started run [bold]{record.id}[/] ({record.ranks} ranks) in {record.run_dir}")
    if armed:
        ui.console.print(escape(deadman_mod.summary(inv, armed)))
    if follow:
        _follow(inv, record)
    else:
        ui.console.print(f"follow it with: fab monitor --run {record.id} --name {inv.cluster}")


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "timeout": "give up watching after this many seconds (the run goes on)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def monitor(c, run=None, name=None, timeout=None, inventory=None):
    """Follow a run live (step, loss, samples/s); exits with the run's success or failure."""
    seconds = _seconds(timeout, "--timeout")
    inv = _inventory(c, name, inventory)
    _follow(inv, runs.find(inv.cluster, run), seconds)


def _follow(inv, record, timeout=None):
    view = monitor_mod.monitor(inv, record, timeout=timeout)
    losses = view.losses()
    summary = f"run {record.id} {view.state} after {view.elapsed:.1f}s (${view.usd:,.2f})"
    if losses:
        summary += f", loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if view.state != "succeeded":
        cause = f" ({view.reason})" if view.reason else ""
        raise Exit(f"{summary}{cause}; see: fab logs --run {record.id} --name {inv.cluster}", code=1)
    ui.console.print(summary)


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "follow": "keep printing until the run ends",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def logs(c, run=None, name=None, follow=False, inventory=None):
    """Print a run's log, or follow it."""
    inv = _inventory(c, name, inventory)
    monitor_mod.logs(inv, runs.find(inv.cluster, run), follow=follow)


@task(help={"run": "run id or prefix (default: the latest)", "name": NAME_HELP, "inventory": INVENTORY_HELP})
@friendly
def cancel(c, run=None, name=None, inventory=None):
    """Stop a run on every node; its log, metrics and checkpoints stay on shared storage."""
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    record = runs.find(inv.cluster, run)
    status = runs.cancel(inv, record)
    ui.console.print(f"run {record.id} {status['state']}")


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "dest": "local folder (default ./runs)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def fetch(c, run=None, name=None, dest="runs", inventory=None):
    """Copy a run's checkpoints, log and metrics to ./runs/<cluster>/<run-id>/."""
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    path = results.fetch(inv, runs.find(inv.cluster, run), Path(dest))
    ui.console.print(f"results in {path}")


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "dest": "local folder (default ./runs)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def plot(c, run=None, name=None, dest="runs", inventory=None):
    """Draw a run's loss and samples/s curves to ./runs/<cluster>/<run-id>/curves.png."""
    inv = _inventory(c, name, inventory)
    record = runs.find(inv.cluster, run)
    local = results.destination(inv, record, Path(dest))
    if inv.running:  # fresh metrics, even mid-run; after `down` the fetched copy is what there is
        local = results.fetch_metrics(inv, record, Path(dest))
    title = f"{record.job}: {record.id} ({record.ranks} ranks)"
    ui.console.print(f"curves in {plot_mod.plot_run(local, title)}")
    telemetry = plot_mod.plot_telemetry(local, title)
    if telemetry:
        ui.console.print(f"GPU, CPU and network per host in {telemetry}")


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "port": "port on 127.0.0.1 of this machine to open TensorBoard at (default 6006)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def tensorboard(c, run=None, name=None, port=None, inventory=None):
    """TensorBoard of a run, served on its first node and tunnelled over SSH to 127.0.0.1 here; Ctrl-C closes it."""
    # No int default: invoke would convert the flag itself and a typo would end in its traceback.
    local_port = _whole("port", port, 0, 65535) if port is not None else tensorboard_mod.DEFAULT_PORT
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    record = runs.find(inv.cluster, run)
    try:
        with tensorboard_mod.serving(inv, record, local_port) as served:
            ui.console.print(f"TensorBoard of {record.id} at {served.url} (served on {served.node}; Ctrl-C closes it)")
            served.wait()
    except KeyboardInterrupt:
        ui.console.print("TensorBoard closed")


@task(
    help={
        "job": "job spec, e.g. training_jobs/dp-mlp.yaml",
        "nodes": "cluster sizes to run it at, in nodes, e.g. 1,2,4 (default)",
        "steps": "max_steps of each run (default: the job's)",
        "name": NAME_HELP,
        "dest": "local folder (default ./runs)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def scaling(c, job, nodes="1,2,4", steps=None, name=None, dest="runs", inventory=None):
    """Run a job at each cluster size in turn; throughput, speed-up and efficiency vs ideal, as a table and a PNG."""
    sizes = scaling_mod.parse_sizes(str(nodes))
    max_steps = _whole("steps", steps, 1) if steps is not None else None
    spec = jobs.load(job)
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    measured, png = scaling_mod.measure(inv, spec, sizes, steps=max_steps, dest=Path(dest), said=ui.console.print)
    ui.console.print(scaling_mod.table(spec.spec.name, measured))
    ui.console.print(f"throughput and efficiency against ideal in {png}")


@task(
    help={
        "name": NAME_HELP,
        "purge": "also delete storage: the shared volume or NFS server, data disks, keys and inventory",
        "stack": "Pulumi stack of a cluster that a stack made (default: the one its inventory names)",
        "yes": "purge a cloud cluster without typing its name (for scripts; a local one never asks)",
    }
)
@friendly
def down(c, name=None, purge=False, stack=None, yes=False):
    """Remove compute; storage is kept unless --purge. Checked against the cloud's listing; safe twice."""
    cluster = _name(c, name)
    if not inventory_mod.path_for(cluster).is_file():
        ui.console.print(f"cluster {cluster!r} does not exist: nothing to remove")
        return
    inv = deadman_mod.settle(inventory_mod.load(cluster))  # parked by the switch: the ledger bills it so
    if purge:
        lifecycle.confirm_purge(inv, yes, _ask if sys.stdin.isatty() else None)
    remaining = lifecycle.down(inv, purge=purge, stack=stack or c.config.trainrig.stack)
    if remaining is None:
        ui.console.print(f"cluster {cluster!r} removed, storage included")
        return
    kept = [f"{n.name} ({n.role} node, ${n.hourly_price_usd:.2f}/h)" for n in remaining.nodes]
    kept += [r.name for r in remaining.retained]
    ui.console.print(f"compute of {cluster!r} removed; kept: {', '.join(kept) or 'nothing'}")
    ui.console.print(f"remove storage too with: fab down --name {cluster} --purge")


@task(
    help={
        "name": NAME_HELP,
        "idle": "power the GPU nodes off when no run has gone on for this long (90s, 5m, 2h)",
        "stall": "power them off when a run has logged no new step for this long",
        "hard_limit": "power them off once the compute has been up this long, whatever it does",
        "off": "disarm the switch",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def deadman(c, name=None, idle=None, stall=None, hard_limit=None, off=False, inventory=None):
    """Arm the cluster's dead-man switch: it ends the GPU nodes on its own (IBM: cancels them), storage stays."""
    limits = {
        "idle": deadman_mod.parse_duration(idle, "--idle") if idle is not None else None,
        "stall": deadman_mod.parse_duration(stall, "--stall") if stall is not None else None,
        "hard_limit": deadman_mod.parse_duration(hard_limit, "--hard-limit") if hard_limit is not None else None,
    }
    if off and any(v is not None for v in limits.values()):
        raise TrainrigError("--off disarms the switch: give it alone")
    if not off and all(v is None for v in limits.values()):
        raise TrainrigError("give at least one of --idle, --stall, --hard-limit (or --off)")
    inv = inventory_mod.require_running(deadman_mod.settle(_inventory(c, name, inventory)))
    settings = deadman_mod.Settings() if off else deadman_mod.with_limits(inv, **limits)
    armed = deadman_mod.arm(inv, settings)
    ui.console.print(escape(deadman_mod.summary(inv, armed)))


@task(help={"all": "every cloud, and clusters whose local state was lost (found by their tags)"})
@friendly
def audit(c, all=False):
    """List what still bills for trainrig clusters; exit 1 when something is in no inventory."""
    report = audit_mod.audit(everything=all)
    for line in report.unchecked:
        ui.console.print(f"[yellow]not checked[/] {line}")
    if report.found:
        ui.console.print(audit_mod.table(report))
    left = report.unaccounted
    if left:
        first = left[0][1]
        raise Exit(
            f"error: {len(left)} billable item(s) that no inventory accounts for, first {first.kind} {first.id} "
            f"of {first.cluster or 'no cluster'}: remove them with fab down --name CLUSTER --purge, or in the cloud",
            code=1,
        )
    ui.console.print("nothing billable outside the inventories")


@task(help={"name": NAME_HELP, "all": "every known cluster, then the ledger of clusters torn down"})
@friendly
def cost(c, name=None, all=False):
    """Hours up and dollars so far per cluster (storage apart) and per run, from the inventory's prices."""
    names = state.known_clusters() if all else [_name(c, name)]
    for cluster in names:
        inv = inventory_mod.load(cluster)
        if not inv.running:
            continue
        bill = cost_mod.bill(deadman_mod.settle(inv))  # parked by the switch: billed at the parked price
        ui.console.print(cost_mod.bill_table(bill))
        if bill.runs:
            ui.console.print(cost_mod.runs_table(bill))
    entries = [e for e in cost_mod.ledger() if all or e["cluster"] in names]
    if entries:
        ui.console.print(cost_mod.ledger_table(entries))
    elif not any(inventory_mod.load(n).running for n in names):
        ui.console.print("nothing running and no bills in the ledger")


@task(help={"name": NAME_HELP, "stack": "Pulumi stack of a cluster that a stack made (default: its inventory's)"})
@friendly
def park(c, name=None, stack=None):
    """Stop the GPU nodes (IBM: a small CPU flavor), disks and set-up kept: GPU billing ends; fab up resumes."""
    inv = lifecycle.park(inventory_mod.load(_name(c, name)), stack=stack or c.config.trainrig.stack)
    ui.console.print(f"cluster {inv.cluster!r} parked ({len(inv.gpu_nodes)} GPU nodes, disks kept)")
    ui.console.print(f"bring it back with: fab up --name {inv.cluster}")


@task(
    help={
        "name": NAME_HELP,
        "node": "the GPU node to capture (default node0); it must be provisioned",
        "image_name": "the GPU node's image name (default: <cluster>-<node>-<time>); the storage node's adds -storage",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def bake(c, name=None, node="node0", image_name=None, inventory=None):
    """Capture a provisioned GPU node and the storage node as images new clusters start from (local images,
    AMIs, IBM image templates)."""
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    baked = bake_mod.bake(inv, node, image_name)
    ui.console.print(f"baked {baked.image}" + (f" and {baked.storage_image}" if baked.storage_image else ""))
    if "create" in clouds.get(inv.cloud).capabilities:  # clusters that fab up makes
        storage = f" --storage-image {baked.storage_image}" if baked.storage_image else ""
        ui.console.print(f"start a cluster from them with: fab up --name NEW --image {baked.image}{storage}")
    else:
        storage = f" and `trainrig:storage_image: {baked.storage_image}`" if baked.storage_image else ""
        ui.console.print(
            f"start clusters from them with `trainrig:image: {baked.image}`{storage} in their stack, then pulumi up"
        )


@task(
    help={
        "stack": "stack name (stacks/Pulumi.<stack>.yaml) or a stack file (default: trainrig.stack)",
        "verify": "also ask the cloud's API whether it would accept every order (creates nothing)",
    }
)
@friendly
def plan(c, stack=None, verify=False):
    """Print the nodes, flavors, disks and $/hour a stack will create (no Pulumi CLI needed)."""
    from rich.markup import escape

    from infra import blueprint, clouds, config

    cfg = config.load_named(stack or c.config.trainrig.stack)
    bp = blueprint.blueprint(cfg)
    ui.console.print(blueprint.table(bp))
    if not verify:
        return
    with ui.status(f"asking {cfg.cloud} whether it would accept this stack"):
        found = clouds.get(cfg.cloud).verify(cfg, bp)
    for note in found.notes:
        ui.console.print(f"note: {escape(note)}", soft_wrap=True)
    if found.problems:
        for problem in found.problems:
            ui.console.print(f"problem: {escape(problem)}", soft_wrap=True)
        raise Exit(f"error: the clouds would refuse this stack: {len(found.problems)} problem(s) above", code=1)
    ui.console.print("the clouds accept this stack")


@task(
    help={
        "name": "cluster name for the demo (default 'demo')",
        "nodes": "GPU-role nodes (default 2)",
        "job": "job spec (default training_jobs/dp-mlp.yaml)",
        "keep": "leave the cluster up afterwards",
        "down_after": "the cluster's dead-man switch powers the GPU nodes off when the run ends; storage stays",
        "grace": "with --down-after: wait this long after the run ends first (90s, 5m, 2h; default 0s)",
    }
)
@friendly
def demo(c, name="demo", nodes=None, job=None, keep=False, down_after=False, grace=None):
    """Up, provision, train, monitor, fetch and down in one command, with a summary."""
    grace_s = _grace(down_after, grace)
    if keep and down_after:
        raise TrainrigError("--keep leaves the cluster up and --down-after tears its compute down: give one")
    demo_mod.demo(
        _name(c, name),
        _count(nodes, "--nodes", 2),
        Path(job) if job else demo_mod.DEFAULT_JOB,
        keep=keep,
        down_after=grace_s,
    )


namespace = Collection(
    up,
    status,
    provision,
    train,
    monitor,
    logs,
    cancel,
    fetch,
    plot,
    tensorboard,
    scaling,
    down,
    demo,
    plan,
    deadman,
    park,
    cost,
    audit,
    bake,
)
namespace.configure({"trainrig": {"cluster": "dev", "nodes": 2, "data_disk_gb": 2, "stack": None, "inventory": None}})
