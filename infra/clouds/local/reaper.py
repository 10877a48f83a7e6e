"""The local cloud's answer to "instance-initiated shutdown = terminate": a GPU node that powers off is removed.

A watcher per cluster, started on the host by `fab up` as a process of its own session (it
outlives the fab command that started it), follows Docker's events for the cluster's GPU node
containers. When one stops because the dead-man switch powered it off (its teardown record on the
shared storage is newer than the node's last start, and names it), the watcher removes the
container and detaches its data disk's loop device, as AWS terminates an instance that shut
itself down; the shared volume and the disk files stay. A node that stops for any other reason
(a restart of Docker or of the host, `docker restart`, a crash) is left for `fab up` to bring
back, as a rebooted VM would be; so is a node the switch parked (trainrig:on_idle: park, `fab up
--on-idle park`), kept stopped with its loop device as `fab park` leaves it. `fab park` and
`fab down` stop the watcher first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra import state
from infra.commands import run, wait_until

ROLE_LABEL = "trainrig.role"


def pid_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "reaper.pid"


def log_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "reaper.log"


def running(cluster: str) -> int | None:
    """The watcher's pid while it runs (checked against its command line, not just the number)."""
    try:
        pid = int(pid_path(cluster).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError):
        return None
    return pid if __name__.encode() in cmdline and cluster.encode() in cmdline else None


def start(cluster: str) -> int:
    """Start the cluster's watcher unless it runs already; returns its pid once it follows the events."""
    pid = running(cluster)
    if pid:
        return pid
    log = log_path(cluster)
    log.parent.mkdir(parents=True, exist_ok=True)
    ready = state.cluster_dir(cluster) / "reaper.ready"
    ready.unlink(missing_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, cluster],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: closing the operator's terminal does not end it
            env={**os.environ, "TRAINRIG_HOME": str(state.home())},
        )
    pid_path(cluster).write_text(str(proc.pid))
    wait_until(ready.exists, timeout=30, interval=0.2, what=f"the host watcher of {cluster} (log: {log})")
    return proc.pid


def stop(cluster: str) -> None:
    pid = running(cluster)
    if pid:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: running(cluster) is None, timeout=30, interval=0.2, what=f"the host watcher of {cluster}")
    pid_path(cluster).unlink(missing_ok=True)


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC {text}", flush=True)


def powered_off_by_the_switch(cluster: str, container: str) -> dict | None:
    """The dead-man switch's teardown record, when it names this node and was written after it last started."""
    from datetime import datetime

    from infra.clouds.local import instance

    node = container.removeprefix(f"trainrig-{cluster}-")
    mount = run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", instance.volume_name(cluster)], check=False)
    started = run(["docker", "inspect", "-f", "{{.State.StartedAt}}", container], check=False)
    if mount.returncode != 0 or started.returncode != 0:
        return None
    try:
        record = json.loads((Path(mount.stdout.strip()) / "trainrig" / "teardown.json").read_text())
        # Docker prints nanoseconds (2026-01-01T10:00:00.123456789Z): seconds are enough here.
        began = datetime.fromisoformat(started.stdout.strip()[:19] + "+00:00").timestamp()
    except (OSError, ValueError):
        return None
    return record if node in record.get("hosts", []) and float(record.get("at", 0)) >= began else None


def reap(cluster: str, container: str) -> None:
    """Remove a GPU node that stopped, and free its disk's loop device (the disk file stays)."""
    from infra.clouds.local import instance

    node = container.removeprefix(f"trainrig-{cluster}-")
    gone = run(["docker", "rm", "-f", container], check=False, timeout=120)
    for loop in instance.BACKEND._loops_of(instance.disk_file(cluster, node)):
        run(["losetup", "--detach", loop], check=False)
    _say(f"{node} stopped: removed ({'ok' if gone.returncode == 0 else gone.stderr.strip()})")


def main(cluster: str) -> int:
    from infra.clouds.local.instance import LABEL

    events = subprocess.Popen(
        [
            "docker",
            "events",
            "--filter",
            "type=container",
            "--filter",
            "event=die",
            "--filter",
            f"label={LABEL}={cluster}",
            "--format",
            '{{.Actor.Attributes.name}} {{index .Actor.Attributes "' + ROLE_LABEL + '"}}',
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: (events.terminate(), sys.exit(0)))
    (state.cluster_dir(cluster) / "reaper.ready").touch()
    _say(f"watching the GPU nodes of {cluster}")
    assert events.stdout is not None
    for line in events.stdout:
        name, _, role = line.strip().partition(" ")
        record = powered_off_by_the_switch(cluster, name) if role == "gpu" else None
        if record and record.get("action") == "park":
            # Parked, as AWS stops an instance made with on_idle park: container and loop device stay.
            _say(f"{name} parked by the dead-man switch: kept stopped, with its disk, for fab up to resume")
        elif record:
            reap(cluster, name)
        elif role == "gpu":
            _say(f"{name} stopped, not by the dead-man switch: left for fab up to bring back")
    return events.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
