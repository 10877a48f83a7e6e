"""The Docker engine behind the local cloud: found running, or started and waited for."""

from __future__ import annotations

import os
import shutil
import subprocess

from infra import state
from infra.commands import run, wait_until
from infra.errors import TrainrigError

INSTALL_HINT = "install it with `apt-get install -y docker.io` (as root), or run `make docker`"


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
