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
    """$TRAINRIG_HOME, or ~/.trainrig: keys and state never live in the repository.

    Always absolute, with `~` expanded: the inventory stores the key's path, which must still
    point at the key when a task runs from another folder. An empty value is refused rather
    than read as the current folder, which would put the private keys in whatever repository
    the operator stands in.
    """
    raw = os.environ.get("TRAINRIG_HOME")
    if raw is None:
        return Path.home() / ".trainrig"
    if not raw.strip():
        raise TrainrigError(
            "TRAINRIG_HOME is set but empty: unset it (state then lives in ~/.trainrig) or set it to a folder"
        )
    return Path(os.path.abspath(os.path.expanduser(raw)))


def private_dir(path: Path) -> Path:
    """A folder of trainrig's state, made owner-only at every level it creates (keys and disks live there)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask; this does not
    return missing[0] if missing else path


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
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def write_atomic(path: Path, text: str) -> None:
    """Replace a file whole (readers never see half of it); new files and folders are owner-only."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


RECORDS_WAIT = 30.0  # seconds a record write waits for another (each holds the lock for milliseconds)


def _lock_path(cluster: str, kind: str) -> Path:
    # Beside the clusters, not inside one: `down --purge` removes the cluster's folder while it
    # holds the lock, and a lock file deleted while held would let a second command lock a new one.
    locks = private_dir(home() / "locks")
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
