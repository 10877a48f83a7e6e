"""Files to and from a node over SFTP: folders up, small texts, private files."""

from __future__ import annotations

import posixpath
import stat
from pathlib import Path


def upload_tree(sftp, local: Path, remote: str) -> None:
    """A local folder to a remote path, parents made as needed; caches (__pycache__) left out."""
    parts = remote.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        mkdir(sftp, "/" + "/".join(parts[:depth]))
    for path in sorted(local.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        target = posixpath.join(remote, *path.relative_to(local).parts)
        if path.is_dir():
            mkdir(sftp, target)
        else:
            sftp.put(str(path), target)


def mkdir(sftp, path: str) -> None:
    """One directory, fine if it is there already."""
    try:
        sftp.mkdir(path)
    except OSError:
        if not stat.S_ISDIR(sftp.stat(path).st_mode):
            raise


def put_text(sftp, path: str, text: str) -> None:
    """A small text file, written whole."""
    with sftp.open(path, "w") as fh:
        fh.write(text)


def put_private(sftp, path: str, text: str) -> None:
    """A file only its owner can read, private from its first byte (the mode is set before anything is written)."""
    with sftp.open(path, "w") as fh:
        fh.chmod(0o600)
        fh.write(text)
