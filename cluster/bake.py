"""`fab bake`: a provisioned GPU node, and the cluster's storage node, as machine images that new
clusters start from.

A GPU node started from a baked image carries the slow phases done (driver, Docker, toolkit,
packages) and their records (cluster/phases.py), so provisioning it runs only the phases whose
inputs differ on the new cluster (names, addresses, keys) or whose work lives outside the image
(the data disk, the SSH mesh, the registry login): no-change time, not first-run time. A storage
node from its baked image has its packages (the package cache, the registry, the NFS server) in
place: its phases run again for the new cluster's addresses, but install nothing.

What belongs to one machine never goes into the image: the mesh key, registry credentials, SSH
host keys (local) and the machine id, and the records of the phases that made them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cluster import phases, provision
from infra import clouds, ui
from infra.errors import TrainrigError
from infra.inventory import Inventory

# Phases whose work is all inside the node's root disk and independent of which cluster it is in.
PORTABLE = ("common", "apt_proxy", "nvidia_driver", "docker", "nvidia_container_toolkit")
# Run in the image (local) or on the node before the capture (cloud). cloud-init clean makes a
# new VM run cloud-init again (its own host keys, hostname and login key).
GENERALIZE = " ; ".join(
    [
        "rm -f /root/.ssh/id_ed25519 /root/.ssh/id_ed25519.pub /root/.docker/config.json",
        f'cd {phases.RECORDS} 2>/dev/null && for f in *; do case " {" ".join(PORTABLE)} " in'
        ' *" $f "*) ;; *) rm -f -- "$f" ;; esac; done',
        "cd /",
        ": > /etc/machine-id",
        "if command -v cloud-init >/dev/null; then cloud-init clean --logs; else rm -f /etc/ssh/ssh_host_*; fi",
        "true",
    ]
)


@dataclass(frozen=True)
class Baked:
    image: str  # the GPU nodes': fab up --image, trainrig:image
    storage_image: str | None  # the storage node's: fab up --storage-image, trainrig:storage_image (None: EFS)


def bake(inv: Inventory, node_name: str = "node0", name: str | None = None) -> Baked:
    """Capture a provisioned GPU node, and the storage node when the cluster has one, as images."""
    if node_name not in {n.name for n in inv.gpu_nodes}:
        raise TrainrigError(f"{node_name!r} is not a GPU node of {inv.cluster!r}; bake one of: {_names(inv)}")
    targets = [inv.node(node_name)] + ([inv.storage_node] if inv.storage_node else [])
    found = phases.read_state(inv, targets)
    for node in targets:
        state = found[node.name]
        if state is None:
            raise TrainrigError(
                f"{node.name} of {inv.cluster!r} does not answer; start it with: fab up --name {inv.cluster}"
            )
        missing = [p.name for p in provision.PHASES if p.name not in state.recorded]
        if missing:
            raise TrainrigError(
                f"{node.name} of {inv.cluster!r} has not finished provisioning ({', '.join(missing)} not done); "
                f"run fab provision --name {inv.cluster} first"
            )
    name = name or f"{inv.cluster}-{node_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    backend = clouds.get(inv.cloud).backend(inv.stack)
    images: dict[str, str] = {}
    generalized: list[str] = []
    try:
        for node in targets:
            image_name = name if node.role == "gpu" else f"{name}-{node.name}"
            with ui.status(f"baking {node.name} of {inv.cluster} into an image"):
                images[node.role], changed = backend.bake(inv, node, image_name, GENERALIZE)
            generalized += [node.name] if changed else []
    finally:
        # Also when a later capture failed: a node generalized for an earlier one must not stay so.
        if generalized:
            # The nodes gave up their mesh keys and credentials for the capture: the phases that made
            # them run again, and every node takes their new mesh keys, so the mesh phase runs everywhere.
            ui.console.print(f"{', '.join(generalized)} generalized for the capture; provisioning again")
            phases.forget(inv, inv.nodes, ["ssh_mesh"])
            provision.provision(inv)
    return Baked(images["gpu"], images.get("storage"))


def _names(inv: Inventory) -> str:
    return ", ".join(n.name for n in inv.gpu_nodes) or "none"
