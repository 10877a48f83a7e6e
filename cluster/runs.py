"""Training runs: launch one detached on the cluster, remember it, and read its files back."""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field, TypeAdapter, ValidationError

from cluster import images, jobs, preflight, transfer
from cluster import launch as launch_mod
from infra import clouds, ssh, state
from infra.commands import wait_until
from infra.errors import TrainrigError
from infra.inventory import Inventory, Node, how_to_start, require_running
from infra.models import Strict, first_error

SUPERVISOR = Path(__file__).parent / "remote" / "supervisor.py"
SAMPLER = Path(__file__).parent / "remote" / "sampler.py"
# Seconds between telemetry samples on each node. The newest sample is on average half of this old
# when fab monitor reads it, and at most all of it: 1 s keeps what it shows under 2 s old.
SAMPLE_EVERY = 1.0
# Every state the supervisor ends a run with (remote/sampler.py keeps its own copy: it imports nothing).
FINAL_STATES = {"succeeded", "failed", "cancelled", "stalled"}


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
    resumed_from: str | None = Field(default=None, description="the run whose last checkpoint this one continues")
    image: str | None = Field(default=None, description="the image id every container of the run started from")

    @property
    def unit(self) -> str:
        return f"trainrig-run-{self.id}"

    @property
    def sampler_unit(self) -> str:
        return f"trainrig-telemetry-{self.id}"


_records = TypeAdapter(list[RunRecord])


def records_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "runs.json"


def records(cluster: str) -> list[RunRecord]:
    path = records_path(cluster)
    if not path.is_file():
        return []
    try:
        return _records.validate_json(path.read_text())
    except ValidationError as exc:
        raise TrainrigError(
            f"{path} is damaged ({first_error(exc)}): restore it from a backup, or move it aside to start "
            "a new list (the runs it held can then only be reached on the cluster's shared storage)"
        ) from None


def _remember(cluster: str, record: RunRecord) -> None:
    with state.records_lock(cluster):
        state.write_atomic(records_path(cluster), _records.dump_json(records(cluster) + [record], indent=2).decode())


def _forget(cluster: str, run_id: str) -> None:
    with state.records_lock(cluster):
        kept = [r for r in records(cluster) if r.id != run_id]
        state.write_atomic(records_path(cluster), _records.dump_json(kept, indent=2).decode())


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


def launch(
    inv: Inventory, job: jobs.LoadedJob, environ: Mapping[str, str] = os.environ, resume: RunRecord | None = None
) -> RunRecord:
    """Start a job in containers across the cluster, detached under systemd on the first node.

    Everything that can be refused is refused before a container starts (the spec against the
    cluster, the secrets in the caller's environment, the hosts); anything that fails after that
    removes what this launch made on every node before the error reaches the user.
    """
    require_running(inv)
    spec = job.spec
    jobs.check_fits(spec, inv)
    plain_env, secret_env = jobs.launch_environment(spec, environ)
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
    preflight.hosts(inv, nodes, inv.storage.mount_point)
    run_id = new_run_id(spec.name)
    resume_from = f"{resume.run_dir}/{spec.checkpoint_dir}" if resume else ""
    paths = launch_mod.RunPaths(
        run_id=run_id,
        run_dir=posixpath.join(inv.storage.mount_point, "trainrig", "runs", run_id),
        shared=inv.storage.mount_point,
        code=bool(spec.code),
        resume_from=resume_from,
    )
    record = RunRecord(
        id=run_id,
        job=spec.name,
        node=nodes[0].name,
        run_dir=paths.run_dir,
        ranks=spec.ranks,
        max_steps=spec.max_steps,
        started_at=datetime.now(UTC),
        nodes=[n.name for n in nodes],
        resumed_from=resume.id if resume else None,
    )
    remembered = False
    try:
        _prepare_run_dir(inv, nodes[0], job, paths)
        image = images.ensure(inv, job, nodes, run_id, paths.run_dir)
        _start_containers(inv, spec, nodes, paths, image, plain_env, secret_env)
        found = preflight.containers(inv, spec, nodes, paths, image)
        mpirun = launch_mod.mpirun_argv(
            spec,
            inv,
            paths,
            mpi_major=found.mpi_major,
            interfaces=list(found.interfaces.values()),
            secret_names=sorted(secret_env),
        )
        run_json = {
            "id": run_id,
            "argv": launch_mod.exec_argv(run_id, mpirun, with_secrets=bool(secret_env)),
            "workdir": paths.run_dir,
            "metrics": spec.metrics.model_dump(),
            "max_steps": spec.max_steps,
            "container": launch_mod.container_name(run_id),
            "peers": [n.name for n in nodes[1:]],
            # Rank r runs on hosts[r // slots] (mapped by slot): how a failure names its host.
            "hosts": [n.name for n in nodes],
            "slots": spec.gpus_per_node,
            "health": spec.health.model_dump(),
            "secrets_file": launch_mod.secrets_file(run_id) if secret_env else None,
        }
        record = record.model_copy(update={"image": image})
        # Recorded before it starts: an interrupt from here on leaves a run that fab cancel can find.
        _remember(inv.cluster, record)
        remembered = True
        _start_samplers(inv, nodes, record, paths, found.interfaces)
        with ssh.open_checked(inv, nodes[0]) as conn:
            transfer.put_text(conn.sftp(), f"{paths.run_dir}/run.json", json.dumps(run_json, indent=2))
            ssh.run(
                conn,
                launch_mod.systemd_run_argv(
                    record.unit, f"trainrig run {run_id}", ["python3", f"{paths.run_dir}/supervisor.py", paths.run_dir]
                ),
                what=f"{nodes[0].name}: starting the run under systemd",
            )
    except BaseException:
        # Nothing half-started: no container on any node, and no record of a run that is not running.
        if remembered:
            # An interrupt may land after systemd started the unit and before we heard so:
            # stop it, so no supervisor goes on for a run that is about to be forgotten.
            _stop_unit(inv, nodes[0], record)
        remove_containers(inv, record)
        if remembered:
            _forget(inv.cluster, record.id)
        raise
    return record


def _stop_unit(inv: Inventory, node: Node, record: RunRecord) -> None:
    try:
        with ssh.open_checked(inv, node, timeout=10) as conn:
            ssh.run(conn, ["systemctl", "stop", record.unit], check=False, timeout=60)
    except TrainrigError:
        pass  # the node is gone: so is the unit


def _prepare_run_dir(inv: Inventory, node: Node, job: jobs.LoadedJob, paths: launch_mod.RunPaths) -> None:
    with ssh.open_checked(inv, node) as conn:
        ssh.run(
            conn,
            ["mkdir", "-p", f"{paths.run_dir}/{job.spec.checkpoint_dir}"],
            what=f"{node.name}: creating the run directory",
        )
        if paths.resume_from:
            # The continuation starts from a copy, so the run it continues keeps its own checkpoints.
            copied = ssh.run(
                conn,
                [
                    "sh",
                    "-c",
                    'test -d "$1" && cp -a "$1/." "$2/"',
                    "resume",
                    paths.resume_from,
                    f"{paths.run_dir}/{job.spec.checkpoint_dir}",
                ],
                check=False,
                timeout=3600,
            )
            if copied.exited != 0:
                raise TrainrigError(
                    f"{node.name}: the run to resume has no checkpoints in {paths.resume_from}; "
                    "pick a run that wrote some (fab fetch shows them)"
                )
        sftp = conn.sftp()
        if job.code_path:
            transfer.upload_tree(sftp, job.code_path, paths.code_dir)
        sftp.put(str(SUPERVISOR), f"{paths.run_dir}/supervisor.py")
        sftp.put(str(SAMPLER), f"{paths.run_dir}/sampler.py")
        sftp.put(str(job.path), f"{paths.run_dir}/job.yaml")


def _start_containers(
    inv: Inventory,
    spec: jobs.JobSpec,
    nodes: list[Node],
    paths: launch_mod.RunPaths,
    image: str,
    plain_env: dict[str, str],
    secret_env: dict[str, str],
) -> None:
    memlock = "memlock" in clouds.get(inv.cloud).capabilities

    def start(node: Node) -> None:
        with_secrets = bool(secret_env) and node is nodes[0]  # mpirun forwards them to every rank
        with ssh.open_checked(inv, node) as conn:
            if with_secrets:
                path = launch_mod.secrets_file(paths.run_id)
                ssh.run(conn, ["install", "-d", "-m", "0700", posixpath.dirname(path)], what=f"{node.name}: /run")
                transfer.put_private(conn.sftp(), path, launch_mod.secrets_text(secret_env))
            argv = launch_mod.docker_run_argv(
                spec, node, paths, image, inv.cluster, plain_env=plain_env, memlock=memlock, with_secrets=with_secrets
            )
            ssh.run(conn, argv, timeout=120, what=f"{node.name}: starting the run's container")

    ssh.on_nodes(nodes, start)


def _start_samplers(
    inv: Inventory, nodes: list[Node], record: RunRecord, paths: launch_mod.RunPaths, interfaces: dict[str, str]
) -> None:
    """Telemetry on every node of the run, host side, until the run ends (see remote/sampler.py)."""

    def start(node: Node) -> None:
        with ssh.open_checked(inv, node) as conn:
            ssh.run(
                conn,
                launch_mod.systemd_run_argv(
                    record.sampler_unit,
                    f"trainrig telemetry of {record.id}",
                    [
                        "python3",
                        f"{paths.run_dir}/sampler.py",
                        paths.run_dir,
                        node.name,
                        interfaces[node.name],
                        paths.shared,
                        str(SAMPLE_EVERY),
                    ],
                    properties=("Nice=10",),
                ),
                what=f"{node.name}: starting the telemetry sampler",
            )

    ssh.on_nodes(nodes, start)


def remove_containers(inv: Inventory, record: RunRecord) -> list[str]:
    """Remove a run's containers (by label) and secrets file on every node that is up; say where that failed."""
    present = {n.name for n in inv.nodes}
    nodes = [inv.node(name) for name in (record.nodes or [n.name for n in inv.gpu_nodes]) if name in present]
    label = f"label=trainrig.run={record.id}"

    def remove(node: Node) -> str | None:
        try:
            with ssh.open_checked(inv, node, timeout=10) as conn:
                ssh.run(
                    conn,
                    [
                        "sh",
                        "-c",
                        'ids=$(docker ps -aq --filter "$1"); [ -z "$ids" ] || docker rm -f $ids',
                        "remove",
                        label,
                    ],
                    timeout=120,
                    what=f"{node.name}: removing the run's container",
                )
                ssh.run(conn, ["rm", "-f", launch_mod.secrets_file(record.id)], check=False)
                ssh.run(conn, ["systemctl", "stop", record.sampler_unit], check=False)
                left = ssh.run(conn, ["docker", "ps", "-aq", "--filter", label], check=False).stdout.strip()
            return f"{node.name}: a container of the run is still there" if left else None
        except TrainrigError as exc:
            return str(exc)

    return [problem for problem in ssh.on_nodes(nodes, remove).values() if problem]


def parse_metric(line: str | bytes) -> dict | None:
    """One metrics.jsonl line with its numbers (step, loss, throughput, time and the job's own metrics); None for a
    line cut short by a copy mid-write, or one without a whole step.

    The file is written on the cluster from what the job prints, so a line may be incomplete or
    hold a value that is not a number: such a value or line is skipped, never the end of a plot or a monitor.
    """
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    metric = {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return metric if isinstance(metric.get("step"), int) else None


def read_status(sftp, record: RunRecord) -> dict | None:
    """The run's status.json; None while there is none (or it is being replaced). A node that does not answer raises."""
    try:
        with sftp.open(f"{record.run_dir}/status.json") as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, ValueError):
        return None


def read_from(sftp, path: str, offset: int) -> bytes:
    """The bytes of a remote file after offset ('' if it does not exist yet)."""
    try:
        with sftp.open(path) as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
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


def cancel(inv: Inventory, record: RunRecord, timeout: float = 60) -> dict:
    """Stop a run: systemd signals the supervisor, which ends mpirun; then no container of the run is left anywhere.

    Removing a container ends every rank in it, so a node whose ranks outlived mpirun (or whose
    launch node is gone) is cleaned all the same.
    """
    status: dict = {"state": "cancelled"}
    if record.node in {n.name for n in inv.nodes}:
        with ssh.open_checked(inv, inv.node(record.node)) as conn:
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
    problems = remove_containers(inv, record)
    if problems:
        raise TrainrigError(f"run {record.id} stopped, but {problems[0]}; run fab cancel again")
    return status


def _final(status: dict | None) -> dict | None:
    """The status once the run has ended, else None (what a wait polls for)."""
    return status if status and status.get("state") in FINAL_STATES else None
