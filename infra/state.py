"""Where trainrig keeps each cluster's files on the operator's machine (outside the repository)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from infra.errors import TrainrigError

CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def home() -> Path:
    """$TRAINRIG_HOME, or ~/.trainrig: keys and state never live in the repository."""
    return Path(os.environ.get("TRAINRIG_HOME", Path.home() / ".trainrig"))


def check_cluster_name(name: str) -> str:
    if not CLUSTER_NAME.match(name):
        raise TrainrigError(
            f"cluster name {name!r} is invalid: use 1-31 lowercase letters, digits or '-', starting with a letter"
        )
    return name


def cluster_dir(name: str) -> Path:
    return home() / "clusters" / check_cluster_name(name)


def known_clusters() -> list[str]:
    root = home() / "clusters"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "inventory.json").is_file())


def write_private(path: Path, data: str | bytes) -> None:
    """Write a secret file readable by the owner only, created with those permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


RECORDS_WAIT = 30.0  # seconds a record write waits for another (each holds the lock for milliseconds)


def _lock_path(cluster: str, kind: str) -> Path:
    # Beside the clusters, not inside one: `down --purge` removes the cluster's folder while it
    # holds the lock, and a lock file deleted while held would let a second command lock a new one.
    locks = home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"{check_cluster_name(cluster)}.{kind}"


@contextmanager
def cluster_lock(cluster: str, command: str) -> Iterator[None]:
    """One change of a cluster at a time (up, down, provision): a second one fails at once, naming the first.

    Waiting would hide a hung command behind a silent one; failing says who holds the cluster. The
    lock is the kernel's (flock), so it goes with the process that held it, even one killed.
    """
    lock = FileLock(_lock_path(cluster, "lock"), timeout=0)
    owner = _lock_path(cluster, "owner")
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else ""
        raise TrainrigError(
            f"cluster {cluster} is busy ({holder or 'another fab command'}); wait for it to finish, "
            "or stop that command first"
        ) from None
    try:
        write_atomic(owner, f"pid {os.getpid()}: fab {command}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


@contextmanager
def records_lock(cluster: str) -> Iterator[None]:
    """Read-modify-write of a cluster's run records, one writer at a time, so no record is ever lost."""
    try:
        with FileLock(_lock_path(cluster, "records.lock"), timeout=RECORDS_WAIT):
            yield
    except Timeout:
        raise TrainrigError(
            f"the run records of {cluster} stayed locked for {RECORDS_WAIT:.0f}s; "
            "another fab command is writing them: try again"
        ) from None
