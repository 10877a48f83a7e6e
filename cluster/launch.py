"""A run's containers and its one mpirun line, as argument lists: pure functions of the spec, the inventory and the run.

Ranks start inside one container per node. mpirun runs in the first node's container and
reaches the other nodes over their own sshd, with the cluster's mesh key and the pinned
known_hosts mounted read-only; there its launch agent is `docker exec` into that node's
container, so the MPI daemon (orted in Open MPI 4, prted in 5) and its ranks live in the job's
image. No port is opened in any container and host keys stay pinned: the choice over an sshd
inside each container on a port of its own.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from cluster.jobs import JobSpec
from infra.inventory import Inventory, Node

DATA_DISK = "/data1"  # the node's own data disk (the data_disk role mounts it)
SECRETS_IN_CONTAINER = "/run/trainrig/secrets.env"
MESH_KEYS = "/root/.ssh"  # the mesh key and authorized_keys of the account that runs MPI (ssh_mesh role)
KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"  # every node's key, pinned by name and address (ssh_mesh role)
SSH_ARGS = "-o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10"


def container_name(run_id: str) -> str:
    return f"trainrig-{run_id}"


def secrets_file(run_id: str) -> str:
    """Where the launch node keeps a run's secrets: tmpfs, root only, gone with the run."""
    return f"/run/trainrig/{run_id}.env"


@dataclass(frozen=True)
class RunPaths:
    run_id: str
    run_dir: str  # on the shared storage, the same path on every node and in every container
    shared: str  # the shared storage's mount point
    code: bool  # the job's code was copied to {run_dir}/code
    resume_from: str = ""  # the checkpoint folder of the run this one continues, if any

    @property
    def code_dir(self) -> str:
        return f"{self.run_dir}/code"

    def placeholders(self, spec: JobSpec) -> dict[str, str]:
        return {
            "run_dir": self.run_dir,
            "code_dir": self.code_dir,
            "checkpoint_dir": f"{self.run_dir}/{spec.checkpoint_dir}",
            "max_steps": str(spec.max_steps or ""),
            "data_dir": self.shared,
            "scratch_dir": DATA_DISK,
            "resume_from": self.resume_from,
            "tensorboard_dir": self.tensorboard_dir(spec),
        }

    def tensorboard_dir(self, spec: JobSpec) -> str:
        return f"{self.run_dir}/{spec.tensorboard.logdir if spec.tensorboard else 'tensorboard'}"

    def environment(self, spec: JobSpec) -> dict[str, str]:
        """What every rank sees from trainrig (names the spec may not use)."""
        return {
            "TRAINRIG_RUN_ID": self.run_id,
            "TRAINRIG_RUN_DIR": self.run_dir,
            "TRAINRIG_CHECKPOINT_DIR": f"{self.run_dir}/{spec.checkpoint_dir}",
            "PYTHONUNBUFFERED": "1",
            **({"TRAINRIG_RESUME_FROM": self.resume_from} if self.resume_from else {}),
        }


def docker_run_argv(
    spec: JobSpec,
    node: Node,
    paths: RunPaths,
    image: str,
    cluster: str,
    *,
    plain_env: dict[str, str],
    memlock: bool,
    with_secrets: bool,
) -> list[str]:
    """The container of one node: host network, GPUs where there are any, NCCL-friendly IPC and limits."""
    c = spec.container
    argv = ["docker", "run", "--detach", "--name", container_name(paths.run_id)]
    argv += ["--label", f"trainrig.run={paths.run_id}", "--label", f"trainrig.cluster={cluster}"]
    argv += ["--network", "host"]
    if node.gpu_count:
        argv += ["--gpus", "all"]
    argv += ["--ipc", "host"] if c.ipc_host else ["--shm-size", c.shm_size]
    ulimits = dict(c.ulimits)
    if memlock:  # NCCL and RDMA pin memory; hosts without the privilege to lift the limit refuse the flag
        ulimits.setdefault("memlock", "-1")
    for name, value in sorted(ulimits.items()):
        argv += ["--ulimit", f"{name}={value}"]
    # Open MPI's shared-memory transport copies between ranks of one node with process_vm_readv.
    argv += ["--cap-add", "SYS_PTRACE"]
    for source, target, mode in _mounts(spec, paths, with_secrets):
        argv += ["--volume", f"{source}:{target}:{mode}"]
    for key, value in {**paths.environment(spec), **spec.env, **plain_env}.items():
        argv += ["--env", f"{key}={value}"]
    workdir = c.workdir or (paths.code_dir if paths.code else None)
    if workdir:
        argv += ["--workdir", workdir]
    if c.user:
        argv += ["--user", c.user]
    # The container only holds the node's place: ranks come in through docker exec.
    return [*argv, "--entrypoint", "sleep", image, "infinity"]


def _mounts(spec: JobSpec, paths: RunPaths, with_secrets: bool) -> list[tuple[str, str, str]]:
    mounts = [
        (paths.shared, paths.shared, "rw"),
        (DATA_DISK, DATA_DISK, "rw"),
        (MESH_KEYS, MESH_KEYS, "ro"),
        (KNOWN_HOSTS, KNOWN_HOSTS, "ro"),
    ]
    if with_secrets:
        mounts.append((secrets_file(paths.run_id), SECRETS_IN_CONTAINER, "ro"))
    return mounts + [(m.source, m.target, "ro" if m.read_only else "rw") for m in spec.container.mounts]


def mpirun_argv(
    spec: JobSpec,
    inv: Inventory,
    paths: RunPaths,
    *,
    mpi_major: int,
    interfaces: list[str],
    secret_names: list[str],
) -> list[str]:
    """One mpirun line for Open MPI 4 or 5: ranks on the first `nodes` GPU nodes, traffic on the private network."""
    nodes = inv.gpu_nodes[: spec.nodes]
    agent = f"docker exec -i {container_name(paths.run_id)} {'prted' if mpi_major >= 5 else 'orted'}"
    # The ranks run as root in the container, as the supervisor does on the host.
    argv = ["mpirun", "--allow-run-as-root", "-np", str(spec.ranks)]
    argv += ["-H", ",".join(f"{n.name}:{spec.gpus_per_node}" for n in nodes)]
    argv += ["--bind-to", spec.mpi.bind_to, "--map-by", spec.mpi.map_by]
    # Each output line carries its rank, so a failure names the rank that failed and what it said last.
    argv += ["--output", "tag"] if mpi_major >= 5 else ["--tag-output"]
    runtime = "--prtemca" if mpi_major >= 5 else "--mca"
    if mpi_major >= 5:
        argv += ["--launch-agent", agent, runtime, "plm_ssh_args", SSH_ARGS]
    else:
        argv += [runtime, "orte_launch_agent", agent, runtime, "plm_rsh_args", SSH_ARGS]
    if inv.network:
        cidr = str(inv.network.cidr)
        argv += ["--mca", "btl_tcp_if_include", cidr, runtime, "oob_tcp_if_include", cidr]
    for name, value in sorted(spec.mpi.mca.items()):
        argv += ["--mca", name, value]
    if interfaces:
        # NCCL picks its socket interface by name; the nodes found theirs in pre-flight (ens5 on
        # AWS Nitro, eth0 or bond0 on IBM), so the list covers each of them.
        argv += ["-x", f"NCCL_SOCKET_IFNAME={','.join(sorted(set(interfaces)))}"]
    # Secrets travel in mpirun's environment (from the tmpfs file), named here, never valued.
    for name in secret_names:
        argv += ["-x", name]
    return argv + [arg.format_map(paths.placeholders(spec)) for arg in spec.command]


def systemd_run_argv(unit: str, description: str, command: list[str], *, properties: tuple[str, ...] = ()) -> list[str]:
    """A command detached under systemd on a node, a unit that goes once it ends (runs, samplers, the switch)."""
    argv = ["systemd-run", "--quiet", "--collect", "--unit", unit, "--property", f"Description={description}"]
    for prop in properties:
        argv += ["--property", prop]
    return argv + command


def exec_argv(run_id: str, command: list[str], *, with_secrets: bool) -> list[str]:
    """Run a command in the launch node's container; with secrets, their file is read into its environment first."""
    argv = ["docker", "exec", container_name(run_id)]
    if not with_secrets:
        return argv + command
    loader = f'set -a; . {shlex.quote(SECRETS_IN_CONTAINER)}; set +a; exec "$@"'
    return argv + ["sh", "-c", loader, "trainrig-launch", *command]


def secrets_text(secrets: dict[str, str]) -> str:
    """The secrets file: NAME='value' lines a POSIX shell reads with `.`."""
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(secrets.items()))
