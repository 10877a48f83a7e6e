"""Local nodes as containers on a private Docker network of the cluster's own."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from infra import inventory as inventory_mod
from infra import keys, ssh, state, ui
from infra.clouds import Billable, ClusterRequest
from infra.clouds.local import engine, image, reaper
from infra.commands import run, wait_until
from infra.errors import TrainrigError
from infra.inventory import STORAGE_NODE, DataDisk, Inventory, Network, Node, Retained, SharedStorage, gpu_node_names

LABEL = "trainrig.cluster"
SHARED_MOUNT = "/data"
DISK_DEVICE = "/dev/xvdc"
READY_TIMEOUT = 120

# A node runs systemd, loop disks and Docker-in-Docker without --privileged (which hosts without
# CAP_SYS_RESOURCE, such as nested containers, refuse) and with as little of the host as that allows.
# Docker's own default capability set: what an ordinary container may do.
DOCKER_DEFAULT_CAPS = (
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
)
# What a node needs beyond that: systemd (mounts, namespaces: SYS_ADMIN), Docker-in-Docker's
# bridges and iptables (NET_ADMIN), and debuggers and MPI's shared-memory transport (SYS_PTRACE).
# Not kept, among others: SYS_MODULE (load kernel modules), SYS_RAWIO, SYS_BOOT, SYS_TIME,
# SYS_RESOURCE, MAC_ADMIN, SYSLOG, BPF, PERFMON: a job on a local node cannot use them on the host.
NODE_CAPS = (*DOCKER_DEFAULT_CAPS, "SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE")
VM_OPTIONS = [
    "--cap-drop",
    "ALL",
    *[arg for cap in NODE_CAPS for arg in ("--cap-add", cap)],
    # Docker's default seccomp profile refuses keyctl, which the nodes' own runc needs to start
    # containers; AppArmor's docker-default profile refuses the mounts systemd makes. Both stay
    # off, and the README says so.
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    # /proc/sys and the other system paths stay masked or read-only (Docker's default); the one
    # setting the nodes' Docker needs is set here, for the node's network namespace only.
    "--sysctl",
    "net.ipv4.ip_forward=1",
    "--cgroupns",
    "host",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs",
    "/run",
    "--tmpfs",
    "/run/lock",
    "--stop-signal",
    "SIGRTMIN+3",
]


def network_name(cluster: str) -> str:
    return f"trainrig-{cluster}"


def volume_name(cluster: str) -> str:
    return f"trainrig-{cluster}-shared"


def container_name(cluster: str, node: str) -> str:
    return f"trainrig-{cluster}-{node}"


def create_disk_image(path: Path, size_gb: int) -> None:
    """A sparse file of size_gb that only the operator can read: it holds the node's data."""
    state.private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.truncate(size_gb * 1024**3)


def disk_file(cluster: str, node: str) -> Path:
    return state.cluster_dir(cluster) / "disks" / f"{node}.img"


class LocalBackend:
    name = "local"
    capabilities = frozenset({"data_disk", "shared_storage", "ssh_mesh"})

    # -- create -------------------------------------------------------------------------
    def create(self, request: ClusterRequest, board) -> Inventory:
        engine.ensure()
        cluster = request.name
        existing = inventory_mod.path_for(cluster)
        if existing.is_file() and inventory_mod.load(cluster).running:
            if self._listing("container", cluster, role="gpu"):
                raise TrainrigError(
                    f"cluster {cluster!r} is already up; use it, or remove it first with: fab down --name {cluster}"
                )
            # Its GPU nodes tore themselves down (the dead-man switch): what is left goes, storage stays.
            reaper.stop(cluster)
            self._remove_compute(cluster)
        node_image = image.ensure_image()
        for flag, baked in (("--image", request.image), ("--storage-image", request.storage_image)):
            if baked and not image.exists(baked):
                raise TrainrigError(
                    f"{flag}: no local node image {baked!r}; "
                    "bake one from a provisioned cluster with fab bake --name CLUSTER"
                )
        gpu_image, storage_image = request.image or node_image, request.storage_image or node_image
        running = run(["docker", "ps", "--quiet"], what="listing running containers").stdout.split()
        engine.ensure_inotify_instances(len(running) + request.gpu_nodes + 1)
        cdir = state.cluster_dir(cluster)
        fresh = not cdir.exists()
        login_pub = keys.ensure_login_key(cdir / "id_ed25519", f"trainrig-{cluster}")
        names = [*gpu_node_names(request.gpu_nodes), STORAGE_NODE]
        created_volume = not self._exists("volume", volume_name(cluster))
        try:
            self._create_network(cluster)
            if created_volume:
                run(
                    ["docker", "volume", "create", "--label", f"{LABEL}={cluster}", volume_name(cluster)],
                    what="creating the shared volume",
                )
            cidr = self._network_cidr(cluster)
            nodes = ssh.on_nodes_by_name(
                names,
                lambda n: self._create_node(
                    cluster,
                    n,
                    storage_image if n == STORAGE_NODE else gpu_image,
                    login_pub,
                    request.data_disk_gb,
                    board,
                ),
            )
        except BaseException:
            # Roll back whatever this call made; the original error is the one the user sees.
            with contextlib.suppress(TrainrigError):
                self._remove_compute(cluster)
            if created_volume:
                run(["docker", "volume", "rm", "-f", volume_name(cluster)], check=False)
            if fresh:
                shutil.rmtree(cdir, ignore_errors=True)
            raise
        inv = Inventory(
            cluster=cluster,
            cloud="local",
            ssh_user="root",
            ssh_private_key=cdir / "id_ed25519",
            nodes=[nodes[n] for n in names],
            storage=SharedStorage(server=STORAGE_NODE, export=SHARED_MOUNT, mount_point=SHARED_MOUNT),
            network=Network(name=network_name(cluster), cidr=cidr),
            on_idle=request.on_idle,
        )
        inventory_mod.save(inv)
        reaper.start(cluster)
        return inv

    # -- reconcile ----------------------------------------------------------------------
    def reconcile(self, inv: Inventory, board) -> tuple[Inventory, list[str]]:
        """Start the nodes that stopped (a restarted engine or host), with their disks; read back the ports
        Docker gave them; wait until every node is ready. Host keys stay as pinned: a node that comes back
        with another key is refused.

        GPU nodes that the dead-man switch powered off were removed by the host watcher, as AWS
        terminates them: those are made anew on the storage that stayed, as `fab up` after a teardown does.
        """
        engine.ensure()
        if inv.gpu_nodes and not self._listing("container", inv.cluster, role="gpu"):
            disk_gb = max((d.size_gb for n in inv.gpu_nodes for d in n.data_disks), default=2)
            request = ClusterRequest(
                name=inv.cluster, gpu_nodes=len(inv.gpu_nodes), data_disk_gb=disk_gb, on_idle=inv.on_idle
            )
            fresh = self.create(request, board)
            self.wait_ready(fresh, board)
            return fresh, [f"its {len(inv.gpu_nodes)} GPU nodes were torn down: made anew, storage kept"]
        done: list[str] = []
        started: list[str] = []

        def bring_back(node: Node) -> Node:
            name = container_name(inv.cluster, node.name)
            found = run(["docker", "inspect", name], check=False)
            if found.returncode != 0:
                raise TrainrigError(
                    f"{node.name} of {inv.cluster!r} is gone (no container {name}); remove the cluster with "
                    f"fab down --name {inv.cluster} and create it again"
                )
            info = json.loads(found.stdout)[0]
            if not info["State"]["Running"]:
                board.update(node.name, "starting")
                for device in info["HostConfig"].get("Devices") or []:
                    self._reattach(inv.cluster, node.name, device["PathOnHost"])
                run(["docker", "start", name], what=f"starting node {node.name}")
                done.append(f"{node.name}: started")
                started.append(node.name)
            address, port = self._addresses(inv.cluster, node.name)
            if port != node.ssh_port or address != str(node.private_address):
                done.append(f"{node.name}: now at 127.0.0.1:{port} ({address}), was :{node.ssh_port}")
            board.update(node.name, "up")
            return Node.model_validate({**node.model_dump(), "private_address": address, "ssh_port": port})

        nodes = ssh.on_nodes(inv.nodes, bring_back)
        # Node names keep their order, so the listing and known_hosts read as before.
        current = inv.model_copy(update={"nodes": [nodes[n.name] for n in inv.nodes]})
        inventory_mod.save(current)
        self.wait_ready(current, board)
        # A started node has its data disk and Docker back only once remounted (see _remount).
        ssh.on_nodes([n for n in current.nodes if n.name in started], lambda n: self._remount(current, n, board))
        reaper.start(inv.cluster)  # the host watcher did not outlive a host restart
        return current, sorted(done)

    def _reattach(self, cluster: str, node: str, loop: str) -> None:
        """After a host restart the node's disk image is no longer on its loop device: attach it there again."""
        path = disk_file(cluster, node)
        if loop in self._loops_of(path):
            return
        if not path.is_file():
            raise TrainrigError(
                f"{node}: its data disk {path} is gone; remove the cluster with fab down --name {cluster}"
            )
        run(["losetup", loop, path], what=f"attaching the data disk of {node} at {loop} again")

    def _create_network(self, cluster: str) -> None:
        if not self._exists("network", network_name(cluster)):
            run(
                [
                    "docker",
                    "network",
                    "create",
                    "--driver",
                    "bridge",
                    "--label",
                    f"{LABEL}={cluster}",
                    network_name(cluster),
                ],
                what="creating the cluster network",
            )

    def _network_cidr(self, cluster: str) -> str:
        out = run(["docker", "network", "inspect", network_name(cluster)], what="reading the cluster network").stdout
        return json.loads(out)[0]["IPAM"]["Config"][0]["Subnet"]

    def _create_node(self, cluster: str, node: str, node_image: str, login_pub: str, disk_gb: int, board) -> Node:
        board.update(node, "attaching data disk")
        loop = self._attach_disk(cluster, node, disk_gb)
        host_key = keys.generate(f"root@{node}")
        role = "storage" if node == STORAGE_NODE else "gpu"
        board.update(node, "creating container")
        run(
            [
                "docker",
                "create",
                "--name",
                container_name(cluster, node),
                "--hostname",
                node,
                "--network",
                network_name(cluster),
                "--label",
                f"{LABEL}={cluster}",
                "--label",
                f"trainrig.role={role}",
                *VM_OPTIONS,
                "--device",
                f"{loop}:{DISK_DEVICE}",
                "-v",
                f"{volume_name(cluster)}:{SHARED_MOUNT}",
                "-p",
                "127.0.0.1::22",
                node_image,
            ],
            what=f"creating node {node}",
        )
        # Keys go in before first boot, so the node's identity is known (and pinned) from the start.
        run(
            ["docker", "cp", "-", f"{container_name(cluster, node)}:/"],
            input=_first_boot_files(host_key, login_pub),
            what=f"writing keys into {node}",
        )
        board.update(node, "booting")
        run(["docker", "start", container_name(cluster, node)], what=f"starting node {node}")
        address, port = self._addresses(cluster, node)
        return Node(
            name=node,
            role=role,
            public_address="127.0.0.1",
            private_address=address,
            ssh_port=port,
            host_key=keys.bare(host_key.public_openssh),
            gpu_count=0,
            gpu_model=None,
            cpus=os.cpu_count() or 1,
            # A kept disk keeps its size, whatever this `up` asked for.
            data_disks=[DataDisk(device=DISK_DEVICE, size_gb=disk_file(cluster, node).stat().st_size // 1024**3)],
            hourly_price_usd=0.0,
            parked_hourly_price_usd=0.0,
        )

    def _attach_disk(self, cluster: str, node: str, size_gb: int) -> str:
        """A sparse file as a block device; an existing file (kept by `down`) keeps its data."""
        path = disk_file(cluster, node)
        if not path.exists():
            create_disk_image(path, size_gb)
        for loop in self._loops_of(path):
            return loop
        return run(
            ["losetup", "--find", "--show", path],
            what=f"attaching the data disk of {node} (needs root and /dev/loop-control)",
        ).stdout.strip()

    def _loops_of(self, path: Path) -> list[str]:
        if shutil.which("losetup") is None:
            return []  # nothing can have been attached without it
        out = run(["losetup", "--associated", path, "--noheadings", "--output", "NAME"], check=False).stdout
        return out.split()

    def _addresses(self, cluster: str, node: str) -> tuple[str, int]:
        name = container_name(cluster, node)
        info = json.loads(run(["docker", "inspect", name]).stdout)[0]
        bindings = (info["NetworkSettings"].get("Ports") or {}).get("22/tcp")
        network = (info["NetworkSettings"].get("Networks") or {}).get(network_name(cluster))
        if not bindings or not network:
            # A node that stopped as it booted has no address and no published port.
            status = info["State"].get("Status", "unknown")
            logs = run(["docker", "logs", "--tail", "1", name], check=False)
            why = (logs.stdout + logs.stderr).strip() or "no output"
            raise TrainrigError(
                f"{node} did not stay up (container {status}; its last words: {why}): see docker logs {name}"
            )
        return network["IPAddress"], int(bindings[0]["HostPort"])

    # -- wait, describe ------------------------------------------------------------------
    def wait_ready(self, inv: Inventory, board) -> None:
        def ready(node: Node) -> None:
            board.update(node.name, "waiting for sshd")
            wait_until(
                lambda: ssh.reachable(inv, node),
                timeout=READY_TIMEOUT,
                interval=0.5,
                what=f"{node.name} to answer SSH with its pinned host key",
            )
            with ssh.open_checked(inv, node) as conn:
                board.update(node.name, "waiting for systemd")
                state_ = ssh.run(conn, ["systemctl", "is-system-running", "--wait"], timeout=READY_TIMEOUT, check=False)
            board.update(node.name, f"[green]ready[/] ({ui.plain(state_.stdout.strip())})")

        ssh.on_nodes(inv.nodes, ready)

    def describe(self, cluster: str) -> Inventory:
        return inventory_mod.load(cluster)

    # -- destroy, billable ---------------------------------------------------------------
    def destroy(self, inv: Inventory, purge: bool) -> Inventory | None:
        engine.ensure()
        cluster = inv.cluster
        reaper.stop(cluster)
        self._remove_compute(cluster)
        disks = sorted(state.cluster_dir(cluster).glob("disks/*.img"))
        # Checked before any image is deleted: a loop device still attached to a deleted image
        # could no longer be found by its file, and would be leaked for good.
        left = self.billable(cluster, volumes=False)
        if left:
            again = f"fab down --name {cluster}" + (" --purge" if purge else "")
            raise TrainrigError(f"removing the nodes of {cluster!r} left: {', '.join(left)}; run {again} again")
        if purge:
            run(["docker", "volume", "rm", "-f", volume_name(cluster)], check=False)
            for path in disks:
                path.unlink()
            leftovers = self.billable(cluster)
            if leftovers:
                raise TrainrigError(f"purge of {cluster!r} left: {', '.join(leftovers)}")
            return None
        kept = [Retained(kind="disk", name=p.name) for p in disks]
        if self._exists("volume", volume_name(cluster)):
            kept.append(Retained(kind="volume", name=volume_name(cluster)))
        remaining = inv.model_copy(update={"nodes": [], "network": None, "retained": kept})
        inventory_mod.save(remaining)
        return remaining

    # -- park, resume ----------------------------------------------------------------------
    def power(self, cluster: str, on: bool) -> dict[str, str]:
        gpu = self._listing("container", cluster, role="gpu")
        if not gpu:
            raise TrainrigError(f"cluster {cluster!r} has no GPU nodes to {'start' if on else 'stop'}")
        if on:
            run(["docker", "start", *gpu], timeout=120, what="starting the GPU nodes")
        else:
            # systemd in each node shuts down cleanly (SIGRTMIN+3); the data disk stays attached to its loop device.
            run(["docker", "stop", "--time", "60", *gpu], timeout=180, what="stopping the GPU nodes")
        return {name.removeprefix(f"trainrig-{cluster}-"): "127.0.0.1" for name in gpu}

    def park(self, inv: Inventory) -> Inventory:
        from datetime import UTC, datetime

        reaper.stop(inv.cluster)  # stopping a node on purpose must not remove it
        self.power(inv.cluster, on=False)
        parked = inv.model_copy(update={"parked_at": datetime.now(UTC)})
        inventory_mod.save(parked)
        return parked

    def resume(self, inv: Inventory, board) -> Inventory:
        self.power(inv.cluster, on=True)
        # Docker publishes sshd on a new loopback port at every start: the inventory follows.
        nodes = []
        for node in inv.nodes:
            if node.role == "gpu":
                board.update(node.name, "started")
                address, port = self._addresses(inv.cluster, node.name)
                node = node.model_copy(update={"ssh_port": port, "private_address": address})
            nodes.append(node)
        resumed = inv.model_copy(update={"nodes": nodes, "parked_at": None})
        inventory_mod.save(resumed)
        self.wait_ready(resumed, board)
        ssh.on_nodes(resumed.gpu_nodes, lambda node: self._remount(resumed, node, board))
        reaper.start(inv.cluster)
        return resumed

    # -- bake -----------------------------------------------------------------------------
    def bake(self, inv: Inventory, node: Node, name: str, generalize: str) -> tuple[str, bool]:
        """The node's container as a node image, generalized in a build step: the node itself is untouched."""
        tag = f"trainrig-baked/{name}"
        snapshot = f"trainrig-baking/{name}"
        run(["docker", "commit", container_name(inv.cluster, node.name), snapshot], timeout=600, what="docker commit")
        try:
            steps = [
                f"FROM {snapshot}",
                f"RUN {json.dumps(['/bin/sh', '-c', generalize])}",
                "LABEL trainrig.image=baked",
            ]
            dockerfile = "\n".join(steps) + "\n"
            run(["docker", "build", "-t", tag, "-"], input=dockerfile.encode(), timeout=600, what="generalizing")
        finally:
            run(["docker", "image", "rm", snapshot], check=False)
        return tag, False

    def _remount(self, inv: Inventory, node: Node, board) -> None:
        """The data disk back on /data1, and Docker restarted onto it (its data root and images live there).

        A node container has no udev, so systemd never sees the disk's by-UUID link that fstab names
        and skips the mount (nofail); Docker then starts on an empty /data1 of the container's own.
        """
        board.update(node.name, "remounting the data disk, restarting Docker")
        script = (
            'if grep -qs "[[:space:]]/data1[[:space:]]" /etc/fstab && ! mountpoint -q /data1; then '
            'mount -o noatime "$1" /data1; fi; '
            "if systemctl is-enabled --quiet docker 2>/dev/null; then systemctl restart docker; fi"
        )
        with ssh.open_checked(inv, node) as conn:
            ssh.run(conn, ["sh", "-c", script, "remount", DISK_DEVICE], timeout=180, what=f"{node.name}: remount")
        board.update(node.name, "[green]ready[/] (disk and Docker back)")

    def _remove_compute(self, cluster: str) -> None:
        containers = self._listing("container", cluster)
        if containers:
            run(["docker", "rm", "-f", *containers], check=False, timeout=120, what="removing nodes")
        for path in state.cluster_dir(cluster).glob("disks/*.img"):
            for loop in self._loops_of(path):
                run(["losetup", "--detach", loop], check=False)
        if self._exists("network", network_name(cluster)):
            run(["docker", "network", "rm", network_name(cluster)], check=False, what="removing the cluster network")

    def billable(self, cluster: str, volumes: bool = True) -> list[str]:
        """Everything Docker still lists for this cluster, plus attached loop devices (volumes: the storage)."""
        found = [f"container {c}" for c in self._listing("container", cluster)]
        found += [f"network {n}" for n in self._listing("network", cluster)]
        if volumes:
            found += [f"volume {v}" for v in self._listing("volume", cluster)]
        for path in state.cluster_dir(cluster).glob("disks/*.img"):
            found += [f"loop device {loop}" for loop in self._loops_of(path)]
        return found

    def audit(self, clusters: set[str], everything: bool) -> list[Billable]:
        engine.ensure(start=False)
        found: list[Billable] = []
        for kind in ("container", "volume", "network"):
            name_field = "{{.Names}}" if kind == "container" else "{{.Name}}"
            every = ["--all"] if kind == "container" else []
            fmt = name_field + ' {{.Label "' + LABEL + '"}}'
            argv = ["docker", kind, "ls", *every, "--filter", f"label={LABEL}", "--format", fmt]
            for line in run(argv, what=f"listing {kind}s").stdout.splitlines():
                name, _, cluster = line.partition(" ")
                if everything or cluster in clusters:
                    node = name.removeprefix(container_name(cluster, "")) if kind == "container" else None
                    found.append(Billable(kind=kind, id=name, cluster=cluster, node=node))
        if shutil.which("losetup"):
            out = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], check=False).stdout
            for line in out.splitlines():
                loop, _, back = line.strip().partition(" ")
                path = Path(back.strip().removesuffix(" (deleted)"))
                # <TRAINRIG_HOME>/clusters/<cluster>/disks/<node>.img: a node's data disk
                if path.suffix == ".img" and path.parent.name == "disks" and path.parents[2].name == "clusters":
                    cluster = path.parents[1].name
                    ours = path.parents[2] == state.home() / "clusters"
                    if everything or (ours and cluster in clusters):
                        found.append(
                            Billable(kind="loop device", id=loop, cluster=cluster, node=path.stem, detail=back)
                        )
        return found

    def _listing(self, kind: str, cluster: str, role: str | None = None) -> list[str]:
        name_field = "{{.Names}}" if kind == "container" else "{{.Name}}"
        every = ["--all"] if kind == "container" else []
        roles = ["--filter", f"label=trainrig.role={role}"] if role else []
        argv = ["docker", kind, "ls", *every, "--filter", f"label={LABEL}={cluster}", *roles, "--format", name_field]
        return run(argv, what=f"listing {kind}s").stdout.split()

    def _exists(self, kind: str, name: str) -> bool:
        return run(["docker", kind, "inspect", name], check=False).returncode == 0


def _first_boot_files(host_key: keys.KeyPair, login_pub: str) -> bytes:
    """A tar stream of the node's host key and authorized_keys, for `docker cp -`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "root/.ssh", None, 0o700)
        _add(tar, "root/.ssh/authorized_keys", login_pub + "\n", 0o600)
        _add(tar, "etc/ssh/ssh_host_ed25519_key", host_key.private_openssh, 0o600)
        _add(tar, "etc/ssh/ssh_host_ed25519_key.pub", host_key.public_openssh + "\n", 0o644)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, text: str | None, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.mode = mode
    if text is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        data = text.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


BACKEND = LocalBackend()
