"""The Docker engine behind the local cloud: found running, or started and waited for."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from infra import state, ui
from infra.commands import run, wait_until
from infra.errors import TrainrigError

INSTALL_HINT = "install it with `apt-get install -y docker.io` (as root), or run `make docker`"

# systemd and dockerd in every local node take inotify instances from one per-user limit on the
# host, shared by all nodes (about 6 a node at boot, more once Docker runs in it). The usual
# default of 128 runs out between 16 and 34 nodes, and a node past it fails to boot.
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
INOTIFY_PER_NODE = 16


def answering() -> bool:
    try:
        return run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=20).returncode == 0
    except TrainrigError:
        return False


def ensure(start: bool = True, timeout: float = 90) -> None:
    """Make sure `docker` talks to a running engine, starting dockerd when we are allowed to."""
    if shutil.which("docker") is None:
        raise TrainrigError(f"the Docker CLI is not installed: {INSTALL_HINT}")
    if answering():
        return
    dockerd = shutil.which("dockerd")
    if not start or dockerd is None or os.geteuid() != 0:
        raise TrainrigError(
            f"the Docker engine is not running and trainrig cannot start it: start dockerd as root, or {INSTALL_HINT}"
        )
    log_path = state.home() / "dockerd.log"
    state.private_dir(log_path.parent)
    with open(log_path, "ab") as log_file:
        # A session of its own, so the engine outlives this command (later tasks need it).
        subprocess.Popen([dockerd], stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(answering, timeout=timeout, interval=1, what=f"the Docker engine to start (log: {log_path})")


def ensure_inotify_instances(nodes: int, limit: Path = INOTIFY_INSTANCES) -> None:
    """Raise the host's inotify instance limit for `nodes` local nodes (as root), or say how to."""
    need = nodes * INOTIFY_PER_NODE
    try:
        have = int(limit.read_text())
    except (OSError, ValueError):
        return  # not Linux's procfs: nothing to check
    if have >= need:
        return
    try:
        limit.write_text(f"{need}\n")
    except OSError:
        raise TrainrigError(
            f"{nodes} local nodes need about {need} inotify instances and this host allows {have}: "
            f"run sysctl -w fs.inotify.max_user_instances={need} as root"
        ) from None
    ui.console.print(f"raised fs.inotify.max_user_instances from {have} to {need} for {nodes} local nodes")
