"""Pre-flight checks before any GPU time is spent: every host in parallel, one line per failing host.

hosts() runs before anything is made for a run: the node answers, Docker runs, the shared
storage is mounted, the checkpoints have room. containers() runs once the run's containers
are up: the image has mpirun, its daemon and ssh; every container answers from the first;
`mpirun hostname` spans them all; each GPU node shows its GPUs inside the container; and each
host has the interface that carries the cluster's private network (MPI's TCP transport and
NCCL's sockets use it, never lo or docker0).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from cluster import launch
from cluster.jobs import JobSpec
from infra import ssh
from infra.errors import TrainrigError
from infra.inventory import Inventory, Node

MIN_FREE_BYTES = 1024**3  # room for at least a first checkpoint
SKIPPED_INTERFACES = ("lo", "docker0")


@dataclass(frozen=True)
class Found:
    mpi_major: int
    interfaces: dict[str, str]  # node -> the interface that carries the private network


def fail_on(problems: dict[str, str | None], what: str) -> None:
    """Raise one line that names every failing host, or nothing when all passed."""
    failing = [text for text in problems.values() if text]
    if failing:
        raise TrainrigError(f"pre-flight {what} failed: " + "; ".join(failing))


def hosts(inv: Inventory, nodes: list[Node], shared: str) -> None:
    def check(node: Node) -> str | None:
        try:
            with ssh.open_checked(inv, node) as conn:
                if ssh.run(conn, ["docker", "info", "--format", "{{.ServerVersion}}"], check=False).exited != 0:
                    return f"{node.name}: Docker is not running (run fab provision)"
                if ssh.run(conn, ["mountpoint", "-q", shared], check=False).exited != 0:
                    return f"{node.name}: shared storage {shared} is not mounted (run fab provision)"
                free = ssh.run(conn, ["df", "--output=avail", "-B1", shared], check=False).stdout.split()
                if free[-1:] and free[-1].isdigit() and int(free[-1]) < MIN_FREE_BYTES:
                    return f"{node.name}: {int(free[-1]) / 1e6:.0f} MB free on {shared}; free space for checkpoints"
        except TrainrigError as exc:
            return str(exc)
        return None

    fail_on(ssh.on_nodes(nodes, check), "check of the hosts")


def containers(inv: Inventory, spec: JobSpec, nodes: list[Node], paths: launch.RunPaths, image: str) -> Found:
    name = launch.container_name(paths.run_id)
    fail_on(ssh.on_nodes(nodes, lambda n: _tools(inv, n, name, image, spec)), "check of the image")
    interfaces = ssh.on_nodes(nodes, lambda n: _interface(inv, n))
    fail_on({n: i[1:] if i.startswith("!") else None for n, i in interfaces.items()}, "check of the network")
    first = nodes[0]
    with ssh.open_checked(inv, first) as conn:
        version = ssh.run(conn, ["docker", "exec", name, "mpirun", "--version"], check=False).stdout
        major = mpi_major(version)
        if major is None:
            raise TrainrigError(
                f"{first.name}: image {image[:19]} has no Open MPI mpirun that says its version "
                "(trainrig launches with Open MPI 4 or 5)"
            )
        reach = {}
        for peer in nodes[1:]:
            probe = ssh.run(
                conn,
                ["docker", "exec", name, "ssh", *launch.SSH_ARGS.split(), peer.name, "docker", "exec", name, "true"],
                check=False,
                timeout=60,
            )
            reach[peer.name] = (
                None
                if probe.exited == 0
                else (
                    f"{peer.name}: its container does not answer from {first.name}'s over SSH "
                    f"({_last(probe)}; run fab provision --tags ssh_mesh)"
                )
            )
        fail_on(reach, "check of the SSH mesh")
        hostnames = [
            "mpirun",
            "--allow-run-as-root",
            "-np",
            str(len(nodes)),
            "-H",
            ",".join(f"{n.name}:1" for n in nodes),
            "--map-by",
            "node",
        ]
        agent = f"docker exec -i {name} {'prted' if major >= 5 else 'orted'}"
        runtime = "--prtemca" if major >= 5 else "--mca"
        hostnames += (
            ["--launch-agent", agent, runtime, "plm_ssh_args", launch.SSH_ARGS]
            if major >= 5
            else [runtime, "orte_launch_agent", agent, runtime, "plm_rsh_args", launch.SSH_ARGS]
        )
        if inv.network:
            hostnames += [runtime, "oob_tcp_if_include", str(inv.network.cidr)]
        answered = ssh.run(conn, ["docker", "exec", name, *hostnames, "hostname"], check=False, timeout=120)
        missing = sorted({n.name for n in nodes} - set(answered.stdout.split()))
        if answered.exited != 0 or missing:
            raise TrainrigError(
                f"pre-flight `mpirun hostname` failed on {first.name}: "
                f"{', '.join(missing) or 'all'} did not answer ({_last(answered)})"
            )
    return Found(major, interfaces)


def _tools(inv: Inventory, node: Node, name: str, image: str, spec: JobSpec) -> str | None:
    script = (
        'for t in mpirun ssh; do command -v "$t" >/dev/null || echo "$t"; done; '
        'command -v orted >/dev/null || command -v prted >/dev/null || echo "orted or prted"'
    )
    try:
        with ssh.open_checked(inv, node) as conn:
            missing = ssh.run(conn, ["docker", "exec", name, "sh", "-c", script], check=False)
            if missing.exited != 0:
                return f"{node.name}: the run's container is not running ({_last(missing)})"
            if missing.stdout.split():
                return (
                    f"{node.name}: image {image[:19]} has no {', '.join(missing.stdout.splitlines())}; "
                    "install Open MPI and openssh-client in the image"
                )
            if node.gpu_count:
                listed = ssh.run(conn, ["docker", "exec", name, "nvidia-smi", "-L"], check=False)
                gpus = len([line for line in listed.stdout.splitlines() if line.startswith("GPU ")])
                if gpus < spec.gpus_per_node:
                    return (
                        f"{node.name}: the container sees {gpus} GPU(s), the job starts {spec.gpus_per_node} "
                        "ranks per node; run fab provision (NVIDIA driver and container toolkit)"
                    )
    except TrainrigError as exc:
        return str(exc)
    return None


def _interface(inv: Inventory, node: Node) -> str:
    """The name of the interface that carries the node's private address, or '!' and why there is none."""
    try:
        with ssh.open_checked(inv, node) as conn:
            listing = ssh.run(conn, ["ip", "-o", "-4", "addr", "show"], check=False).stdout
    except TrainrigError as exc:
        return "!" + str(exc)
    name = interface_for(listing, str(node.private_address))
    if name is None:
        return (
            f"!{node.name}: no interface carries its private address {node.private_address}; "
            "MPI and NCCL need it (check the node's network)"
        )
    return name


def interface_for(ip_addr_output: str, address: str) -> str | None:
    """From `ip -o -4 addr show`: the interface holding address, never lo or docker0."""
    wanted = ipaddress.ip_address(address)
    for line in ip_addr_output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "inet":
            name = fields[1].split("@")[0]
            if name not in SKIPPED_INTERFACES and ipaddress.ip_interface(fields[3]).ip == wanted:
                return name
    return None


def mpi_major(version_output: str) -> int | None:
    """4 from 'mpirun (Open MPI) 4.1.4', 5 from 'mpirun (Open MPI) 5.0.7'; None for anything else."""
    match = re.search(r"\(Open MPI\)\s+(\d+)\.", version_output)
    return int(match.group(1)) if match else None


def _last(result) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.exited}"
