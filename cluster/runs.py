"""Training runs: launch one detached on the cluster, remember it, and read its files back."""

from __future__ import annotations

import json
import posixpath
import secrets
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import TypeAdapter

from cluster import jobs
from infra import ssh, state
from infra.commands import wait_until
from infra.errors import TrainrigError
from infra.inventory import Inventory, Node, how_to_start, require_running
from infra.models import Strict

SUPERVISOR = Path(__file__).parent / "remote" / "supervisor.py"
FINAL_STATES = {"succeeded", "failed", "cancelled"}


class RunRecord(Strict):
    id: str
    job: str
    node: str
    run_dir: str
    ranks: int
    max_steps: int | None
    started_at: datetime
    # Every node that runs a rank: cancel checks them all (records from before this field: empty).
    nodes: list[str] = []

    @property
    def unit(self) -> str:
        return f"trainrig-run-{self.id}"


_records = TypeAdapter(list[RunRecord])


def records_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "runs.json"


def records(cluster: str) -> list[RunRecord]:
    path = records_path(cluster)
    return _records.validate_json(path.read_text()) if path.is_file() else []


def _remember(cluster: str, record: RunRecord) -> None:
    state.write_atomic(records_path(cluster), _records.dump_json(records(cluster) + [record], indent=2).decode())


def find(cluster: str, run_id: str | None) -> RunRecord:
    """A run by id (or unique prefix); the latest run when no id is given."""
    known = records(cluster)
    if not known:
        raise TrainrigError(
            f"cluster {cluster!r} has no runs yet; start one with: fab train --job training_jobs/<job>.yaml"
        )
    if not run_id:
        return known[-1]
    matches = [r for r in known if r.id == run_id] or [r for r in known if r.id.startswith(run_id)]
    if len(matches) != 1:
        sample = ", ".join(r.id for r in known[-3:])
        raise TrainrigError(f"no single run matches {run_id!r} on {cluster!r} (recent: {sample})")
    return matches[0]


def new_run_id(job_name: str) -> str:
    return f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def launch(inv: Inventory, job: jobs.LoadedJob) -> RunRecord:
    """Copy the job to shared storage and start it under systemd on the first node: detached."""
    require_running(inv)
    spec = job.spec
    jobs.check_fits(spec, inv)
    if inv.storage is None:
        raise TrainrigError(f"cluster {inv.cluster!r} has no shared storage to hold runs")
    if inv.ssh_user != "root":
        # Runs are system units whose ranks write to the shared storage as root; a sudo login
        # would create the run directory as itself, which root (squashed over NFS) cannot write.
        raise TrainrigError(
            f"cluster {inv.cluster!r} logs in as {inv.ssh_user!r}; runs need the root login: "
            "remove trainrig:ssh_user from the stack (root is the default) and pulumi up"
        )
    nodes = inv.gpu_nodes[: spec.nodes]
    preflight(inv, nodes)
    run_id = new_run_id(spec.name)
    run_dir = posixpath.join(inv.storage.mount_point, "trainrig", "runs", run_id)
    argv = jobs.mpirun_argv(spec, inv, run_dir)
    run_json = {
        "id": run_id,
        "argv": argv,
        "workdir": f"{run_dir}/code" if spec.code else run_dir,
        "metrics": spec.metrics.model_dump(),
        "max_steps": spec.max_steps,
    }
    record = RunRecord(
        id=run_id,
        job=spec.name,
        node=nodes[0].name,
        run_dir=run_dir,
        ranks=spec.ranks,
        max_steps=spec.max_steps,
        started_at=datetime.now(UTC),
        nodes=[n.name for n in nodes],
    )
    with ssh.open_checked(inv, nodes[0]) as conn:
        ssh.run(conn, ["mkdir", "-p", f"{run_dir}/{spec.checkpoint_dir}"], what="creating the run directory")
        sftp = conn.sftp()
        if job.code_path:
            upload_tree(sftp, job.code_path, f"{run_dir}/code")
        sftp.put(str(SUPERVISOR), f"{run_dir}/supervisor.py")
        sftp.put(str(job.path), f"{run_dir}/job.yaml")
        _put_text(sftp, f"{run_dir}/run.json", json.dumps(run_json, indent=2))
        ssh.run(
            conn,
            [
                "systemd-run",
                "--quiet",
                "--collect",
                "--unit",
                record.unit,
                "--property",
                f"Description=trainrig run {run_id}",
                "python3",
                f"{run_dir}/supervisor.py",
                run_dir,
            ],
            what="starting the run under systemd",
        )
    _remember(inv.cluster, record)
    return record


def preflight(inv: Inventory, nodes: list[Node]) -> None:
    """Every node of the job reachable, the shared storage mounted, mpirun installed."""
    mount = inv.storage.mount_point if inv.storage else "/"

    def check(node: Node) -> str | None:
        try:
            with ssh.open_checked(inv, node) as conn:
                probe = ssh.run(conn, ["sh", "-c", 'test -d "$1" && command -v mpirun', "probe", mount], check=False)
        except TrainrigError as exc:
            return str(exc)
        return (
            None if probe.exited == 0 else f"{node.name}: shared storage {mount} or mpirun missing (run fab provision)"
        )

    problems = [p for p in ssh.on_nodes(nodes, check).values() if p]
    if problems:
        raise TrainrigError(f"pre-flight check failed: {problems[0]}")


def upload_tree(sftp, local: Path, remote: str) -> None:
    _mkdir(sftp, remote)
    for path in sorted(local.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        target = posixpath.join(remote, *path.relative_to(local).parts)
        if path.is_dir():
            _mkdir(sftp, target)
        else:
            sftp.put(str(path), target)


def _mkdir(sftp, path: str) -> None:
    try:
        sftp.mkdir(path)
    except OSError:
        if not stat.S_ISDIR(sftp.stat(path).st_mode):
            raise


def _put_text(sftp, path: str, text: str) -> None:
    with sftp.open(path, "w") as fh:
        fh.write(text)


def read_status(sftp, record: RunRecord) -> dict | None:
    try:
        with sftp.open(f"{record.run_dir}/status.json") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None


def read_from(sftp, path: str, offset: int) -> bytes:
    """The bytes of a remote file after offset ('' if it does not exist yet)."""
    try:
        with sftp.open(path) as fh:
            fh.seek(offset)
            return fh.read()
    except OSError:
        return b""


def reader_node(inv: Inventory, record: RunRecord) -> Node:
    """Where to read a run from: its launch node while it exists, else the storage node."""
    names = {n.name for n in inv.nodes}
    if record.node in names:
        return inv.node(record.node)
    if inv.storage_node:
        return inv.storage_node
    # EFS has no node of its own: with the GPU nodes gone, nothing can read the share.
    raise TrainrigError(
        f"no node of {inv.cluster!r} is up to read run {record.id} from; start it with: {how_to_start(inv)}"
    )


def cancel(inv: Inventory, record: RunRecord, timeout: float = 60, grace: float = 10) -> dict:
    """Stop a run: systemd signals the supervisor, which ends mpirun; then make sure no rank is left.

    mpirun returns before its remote daemons have reaped their ranks, so the supervisor's
    'cancelled' comes a moment before the last rank on another node exits. A run is not
    cancelled until that node is clean: wait for it, and kill what outlives the grace period.
    """
    node = inv.node(record.node)
    with ssh.open_checked(inv, node) as conn:
        sftp = conn.sftp()
        status = read_status(sftp, record) or {}
        if status.get("state") not in FINAL_STATES:
            ssh.run(conn, ["systemctl", "stop", record.unit], check=False, timeout=timeout, what="stopping the run")
            status = wait_until(
                lambda: _final(read_status(sftp, record)),
                timeout=timeout,
                interval=0.5,
                what=f"run {record.id} to stop",
            )
    present = {n.name for n in inv.nodes}
    nodes = [inv.node(name) for name in (record.nodes or [n.name for n in inv.gpu_nodes]) if name in present]
    ssh.on_nodes(nodes, lambda n: _end_ranks(inv, n, record, grace))
    return status


def _rank_pids(conn, record: RunRecord) -> list[str]:
    """Processes of this run on a node: the ranks carry TRAINRIG_RUN_DIR=<run dir> in their environment."""
    marker = f"TRAINRIG_RUN_DIR={record.run_dir}"
    found = ssh.run(
        conn,
        ["sh", "-c", 'grep -lszxF -- "$1" /proc/[0-9]*/environ', "find-ranks", marker],
        check=False,
        what="looking for the run's ranks",
    )
    return [path.split("/")[2] for path in found.stdout.split() if path.startswith("/proc/")]


def _end_ranks(inv: Inventory, node: Node, record: RunRecord, grace: float) -> None:
    with ssh.open_checked(inv, node) as conn:
        try:
            wait_until(
                lambda: not _rank_pids(conn, record),
                timeout=grace,
                interval=0.25,
                what=f"the ranks of {record.id} on {node.name} to exit",
            )
        except TrainrigError:
            ssh.run(conn, ["kill", "-KILL", *_rank_pids(conn, record)], check=False, what="killing left-over ranks")
            wait_until(
                lambda: not _rank_pids(conn, record),
                timeout=grace,
                interval=0.25,
                what=f"the ranks of {record.id} on {node.name} to be killed",
            )


def _final(status: dict | None) -> dict | None:
    """The status once the run has ended, else None (what a wait polls for)."""
    return status if status and status.get("state") in FINAL_STATES else None
