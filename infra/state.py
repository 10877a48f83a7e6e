"""Where trainrig keeps each cluster's files on the operator's machine (outside the repository)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

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
