"""Teardown that lives on the cluster: arm the dead-man switch (remote/deadman.py) and read what it did.

The switch runs under systemd on the storage node (with EFS, on the first GPU node), reads its
settings from the shared storage and needs no fab process on the operator's side. Arming it
again replaces its settings: `fab train --down-after` adds the run to whatever `fab deadman` set.
"""

from __future__ import annotations

import json
import posixpath
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from cluster import launch, runs, transfer
from cluster.jobs import LoadedJob
from cluster.runs import FINAL_STATES, RunRecord
from infra import clouds, config, ssh, state
from infra import inventory as inventory_mod
from infra.errors import TrainrigError
from infra.inventory import Inventory, Node
from infra.models import Strict

SCRIPT = Path(__file__).parent / "remote" / "deadman.py"
UNIT = "trainrig-deadman"
# Where a cloud's cancel credential (clouds.CancelPlan) lives on the switch's node: root-only, and
# outside the shared storage, which every node mounts.
CREDENTIAL = "/etc/trainrig/deadman-credential.json"
DURATION = re.compile(r"^(\d+)(s|m|h)$")
UNITS = {"s": 1, "m": 60, "h": 3600}
CHECK_EVERY = 2.0  # seconds between the switch's looks at the runs: idle time after a run is at most this


def parse_duration(text: str | int | float, flag: str) -> float:
    """'90s', '5m', '2h' (or plain seconds) to seconds; anything else, or negative, is one line naming the flag."""
    raw = str(text).strip()
    if raw.isdigit():
        return float(raw)
    match = DURATION.match(raw)
    if not match:
        raise TrainrigError(f"{flag} {raw!r}: not a duration; write it like 90s, 5m or 2h")
    return float(int(match.group(1)) * UNITS[match.group(2)])


class Settings(Strict):
    """What the switch watches for (seconds; None: not watched)."""

    idle: float | None = None
    stall: float | None = None
    hard_limit: float | None = None
    after_run: dict | None = None  # {"id", "run_dir", "grace"}

    @property
    def armed(self) -> bool:
        return any(v is not None for v in (self.idle, self.stall, self.hard_limit, self.after_run))

    def describe(self) -> str:
        parts = []
        if self.after_run:
            parts.append(f"down after run {self.after_run['id']} (grace {span(self.after_run['grace'])})")
        for label, value in (("idle", self.idle), ("stall", self.stall), ("hard limit", self.hard_limit)):
            if value is not None:
                parts.append(f"{label} {span(value)}")
        return ", ".join(parts) or "disarmed"


def span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def settings_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "deadman.json"


def saved(cluster: str) -> Settings:
    path = settings_path(cluster)
    return Settings.model_validate_json(path.read_text()) if path.is_file() else Settings()


def require_verifiable(inv: Inventory) -> clouds.CancelPlan | None:
    """Refuse, before a run starts, a cluster whose compute cannot end itself in a way we can check.

    Returns how the switch cancels the GPU servers through the cloud's API, on clouds where a node's
    own power-off does not end its bill (None: powering off is enough)."""
    cloud = clouds.get(inv.cloud)
    plan = None
    if "cancel_from_cluster" in cloud.capabilities:
        plan = cloud.switch_cancel(inv)  # type: ignore[attr-defined]
    else:
        clouds.require(
            cloud,
            "self_teardown",
            f"tear their compute down from the cluster yet: run fab down --name {inv.cluster} when the run ends",
        )
    if "pulumi_stack" in cloud.capabilities and shutil.which("pulumi") is None:
        raise TrainrigError(
            f"cluster {inv.cluster!r} lives in a Pulumi stack, and without the Pulumi CLI its teardown cannot be "
            "checked (pulumi refresh): install it from https://www.pulumi.com/docs/install/"
        )
    config.check_cluster_credentials(inv)  # the cloud must answer to show the compute gone (or parked)
    if inv.storage is None:
        raise TrainrigError(f"cluster {inv.cluster!r} has no shared storage for the dead-man switch to watch")
    if not inv.gpu_nodes:
        raise TrainrigError(f"cluster {inv.cluster!r} has no GPU nodes to tear down")
    return plan


def host_of(inv: Inventory) -> Node:
    """Where the switch lives: the storage node, which outlives the compute; else the first GPU node."""
    return inv.storage_node or inv.gpu_nodes[0]


def paths(inv: Inventory) -> tuple[str, str]:
    assert inv.storage is not None
    base = posixpath.join(inv.storage.mount_point, "trainrig", "deadman")
    return base, posixpath.join(inv.storage.mount_point, "trainrig", "teardown.json")


MESH_PROBE = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]


def preflight(inv: Inventory) -> clouds.CancelPlan | None:
    """Everything `arm` needs, checked before a run starts: a cloud whose nodes end their own
    billing (or the switch's credential to cancel them), and every GPU node reachable from the
    switch's node (it stops them over the mesh)."""
    plan = require_verifiable(inv)
    if plan is not None:
        return plan  # the servers are cancelled through the cloud's API, not over the mesh
    home = host_of(inv)
    with ssh.open_checked(inv, home) as conn:
        for node in inv.gpu_nodes:
            if node.name == home.name:
                continue
            probe = ssh.run(conn, [*MESH_PROBE, node.name, "true"], check=False, timeout=30)
            if probe.exited != 0:
                raise TrainrigError(
                    f"{home.name} cannot reach {node.name} over the cluster's SSH mesh, so it could not stop it: "
                    f"run fab provision --name {inv.cluster} --tags ssh_mesh"
                )
    return None


def arm(inv: Inventory, settings: Settings, every: float = CHECK_EVERY) -> Settings:
    """Start (or restart) the switch with these settings, after the checks of `preflight`; disarming
    needs no checks, and removes the switch's credential from its node."""
    plan = preflight(inv) if settings.armed else None
    assert inv.storage is not None
    home = host_of(inv)
    base, record = paths(inv)
    gpu = [n.name for n in inv.gpu_nodes]
    with ssh.open_checked(inv, home) as conn:
        # When the compute came up: how long PID 1 of the first GPU node has run (a VM's boot, a container's start).
        with ssh.open_checked(inv, inv.gpu_nodes[0]) as first:
            uptime = float(ssh.run(first, ["ps", "-o", "etimes=", "-p", "1"], what="reading the node's uptime").stdout)
        now = time.time()
        config = {
            "cluster": inv.cluster,
            "shared": inv.storage.mount_point,
            "hosts": gpu,
            "every": every,
            "armed_at": now,
            "up_since": now - uptime,
            "action": inv.on_idle,  # down: the nodes end themselves; park: they stop, disks kept
            **settings.model_dump(),
        }
        ssh.run(conn, ["systemctl", "stop", UNIT], check=False, timeout=60)
        ssh.run(conn, ["systemctl", "reset-failed", UNIT], check=False)
        ssh.run(conn, ["mkdir", "-p", base], what=f"{home.name}: the switch's folder")
        # A teardown record belongs to the compute it tore down: a fresh arming keeps it as history.
        _keep_as_history(conn, record)
        sftp = conn.sftp()
        if plan is not None:
            # Over SFTP, private from its first byte: never on a command line, in a log or on the shared storage.
            ssh.run(conn, ["install", "-d", "-m", "0700", posixpath.dirname(CREDENTIAL)], what=f"{home.name}: /etc")
            transfer.put_private(sftp, CREDENTIAL, plan.credential)
            config.update(plan.config, credential=CREDENTIAL)
        else:
            ssh.run(conn, ["rm", "-f", CREDENTIAL], check=False)
        sftp.put(str(SCRIPT), f"{base}/deadman.py")
        transfer.put_text(sftp, f"{base}/config.json", json.dumps(config, indent=2))
        if settings.armed:
            ssh.run(
                conn,
                launch.systemd_run_argv(
                    UNIT,
                    f"trainrig dead-man switch of {inv.cluster}",
                    ["python3", f"{base}/deadman.py", f"{base}/config.json"],
                ),
                what=f"{home.name}: starting the dead-man switch",
            )
    state.write_atomic(settings_path(inv.cluster), settings.model_dump_json(indent=2))
    return settings


def launch_run(
    inv: Inventory, job: LoadedJob, resume: RunRecord | None = None, down_after: float | None = None
) -> tuple[RunRecord, Settings | None]:
    """Start a run (runs.launch); with `down_after` (the grace, in seconds) the switch is first checked able
    to tear the compute down, before anything starts, then armed to do it once the run ends. The one path of
    `fab train --down-after` and `fab demo --down-after`."""
    if down_after is not None:
        preflight(inv)
    record = runs.launch(inv, job, resume=resume)
    if down_after is None:
        return record, None
    try:
        return record, arm(inv, with_run(inv, record.id, record.run_dir, down_after))
    except (TrainrigError, OSError) as exc:
        # The user asked for the compute to go when the run ends: a run nothing would tear down must not go on.
        runs.cancel(inv, record)
        raise TrainrigError(
            f"the dead-man switch could not be armed ({exc}), so run {record.id} was cancelled: "
            "fix that and run it again"
        ) from exc


def _keep_as_history(conn, record: str) -> None:
    ssh.run(conn, ["sh", "-c", 'test ! -f "$1" || mv "$1" "$1.$(date +%s)"', "keep", record], check=False)


def with_run(inv: Inventory, run_id: str, run_dir: str, grace: float) -> Settings:
    """The saved settings plus tearing down after this run."""
    return saved(inv.cluster).model_copy(update={"after_run": {"id": run_id, "run_dir": run_dir, "grace": grace}})


def with_limits(inv: Inventory, idle: float | None, stall: float | None, hard_limit: float | None) -> Settings:
    """New limits (they replace the saved ones); a saved --down-after run is kept only while it still runs,
    so re-arming after a teardown cannot fire at once on a run of the compute that is gone."""
    after = saved(inv.cluster).after_run
    if after:
        try:
            with ssh.open_checked(inv, host_of(inv)) as conn, conn.sftp().open(f"{after['run_dir']}/status.json") as fh:
                over = json.loads(fh.read()).get("state") in FINAL_STATES
        except (FileNotFoundError, ValueError):
            over = True
        if over:
            after = None
    return Settings(idle=idle, stall=stall, hard_limit=hard_limit, after_run=after)


def forget_credential(inv: Inventory) -> None:
    """After `fab down`: the switch's cancel credential has nothing left to cancel; remove it from the
    storage node, if it answers (best effort: the credential can cancel only this cluster's servers)."""
    if "cancel_from_cluster" not in clouds.get(inv.cloud).capabilities or inv.storage_node is None:
        return
    try:
        with ssh.open_checked(inv, inv.storage_node, timeout=10) as conn:
            ssh.run(conn, ["systemctl", "stop", UNIT], check=False, timeout=60)
            ssh.run(conn, ["rm", "-f", CREDENTIAL], check=False, timeout=30)
    except (TrainrigError, OSError):
        pass


def summary(inv: Inventory, settings: Settings) -> str:
    """One line on what the armed switch watches for, and what it does to the GPU nodes when it fires."""
    text = f"dead-man switch on {host_of(inv).name}: {settings.describe()}"
    if settings.armed:
        text += "; it parks the GPU nodes (disks kept)" if inv.on_idle == "park" else "; it ends the GPU nodes"
    return text


def settle(inv: Inventory) -> Inventory:
    """The inventory marked parked when the switch parked its GPU nodes (trainrig:on_idle: park), so every
    command sees what `fab park` would have left: `fab up` resumes it, `fab cost` bills the parked price,
    `fab train` says to bring it back. A record older than the inventory belongs to compute made since."""
    if inv.on_idle != "park" or inv.parked_at or not inv.running:
        return inv
    record = teardown_record(inv)
    if record is None or not parked_by_switch(record) or not record.get("compute_gone_at"):
        return inv
    if record["at"] < inv.updated_at.timestamp():
        return inv
    parked = inv.model_copy(update={"parked_at": datetime.fromtimestamp(record["compute_gone_at"], UTC)})
    inventory_mod.save(parked)
    return parked


def rearm_after_park(inv: Inventory) -> Settings:
    """After `fab up` brought back what the switch parked: the switch again, with its limits (a --down-after
    run that ended is dropped); arming also moves the old record aside, so the cluster no longer reads as parked."""
    saved_settings = saved(inv.cluster)
    try:
        return arm(inv, with_limits(inv, saved_settings.idle, saved_settings.stall, saved_settings.hard_limit))
    except TrainrigError:
        # Not armed, but the compute is back all the same: its old record must not make it read as parked.
        with ssh.open_checked(inv, host_of(inv)) as conn:
            _keep_as_history(conn, paths(inv)[1])
        raise


def teardown_record(inv: Inventory) -> dict | None:
    """What the switch last did (teardown.json on the shared storage), read through a node that answers."""
    if inv.storage is None:
        return None
    _, record = paths(inv)
    for node in [n for n in [inv.storage_node, *inv.gpu_nodes] if n is not None]:
        try:
            with ssh.open_checked(inv, node, timeout=5) as conn, conn.sftp().open(record) as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except (TrainrigError, OSError, ValueError):
            continue
    return None


def parked_by_switch(record: dict | None) -> bool:
    return record is not None and record.get("action") == "park"


def describe_record(record: dict) -> str:
    when = datetime.fromtimestamp(record["at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    done = "parked" if parked_by_switch(record) else "torn down"
    text = f"compute {done} by {record['by']} at {when} ({record['trigger']}): {record['reason']}"
    if record.get("compute_gone_at"):
        gone = "stopped, disks kept," if parked_by_switch(record) else "gone"
        text += f"; every GPU node {gone} {record['compute_gone_at'] - record['at']:.0f}s later"
    elif record.get("still_up"):
        verb = "still billing" if record.get("cancelled") is not None else "still answering"
        text += f"; {verb}: {', '.join(record['still_up'])} (run fab down)"
        errors = record.get("errors") or {}
        text += "".join(f"; {host}: {why}" for host, why in errors.items())
    return text
