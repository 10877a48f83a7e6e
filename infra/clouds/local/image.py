"""The local node image: built once from node_image/, rebuilt only when that definition changes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from infra import ui
from infra.commands import run, stream
from infra.errors import TrainrigError

DEFINITION = Path(__file__).parent / "node_image"
REGISTRY_BASE = "debian:bookworm-slim"
MIRROR = "http://deb.debian.org/debian"


def definition_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(DEFINITION.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def tag() -> str:
    return f"trainrig-node:{definition_digest()}"


def exists(image: str) -> bool:
    return run(["docker", "image", "inspect", image], check=False, timeout=30).returncode == 0


def packages() -> list[str]:
    return (DEFINITION / "packages.txt").read_text().split()


def ensure_image() -> str:
    """Return the node image tag, building it (and its base) only if it is not cached."""
    image = tag()
    if exists(image):
        return image
    base = _registry_base() or _debootstrap_base()
    with ui.status(f"building node image {image} from {base}") as show:
        stream(
            [
                "docker",
                "build",
                "--build-arg",
                f"BASE={base}",
                "--label",
                "trainrig.image=node",
                "-t",
                image,
                str(DEFINITION),
            ],
            show,
            timeout=1800,
            what="building the node image",
        )
    return image


def _registry_base() -> str | None:
    """debian:bookworm-slim when a registry answers; None when it does not (offline machines)."""
    if exists(REGISTRY_BASE):
        return REGISTRY_BASE
    with ui.status(f"pulling {REGISTRY_BASE}"):
        pulled = run(["docker", "pull", REGISTRY_BASE], check=False, timeout=300).returncode == 0
    return REGISTRY_BASE if pulled else None


def _debootstrap_base() -> str:
    """A Debian 12 root file system from Debian's archive, imported as an image (no registry needed)."""
    digest = hashlib.sha256((DEFINITION / "packages.txt").read_bytes()).hexdigest()[:12]
    base = f"trainrig-rootfs:{digest}"
    if exists(base):
        return base
    if shutil.which("debootstrap") is None:
        raise TrainrigError("no image registry answers and debootstrap is missing: apt-get install -y debootstrap")
    with tempfile.TemporaryDirectory(prefix="trainrig-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages())}", "bookworm", rootfs, MIRROR]
        with ui.status("debootstrap: Debian 12 root file system from Debian's archive") as show:
            stream(argv, show, timeout=1800, what="debootstrap of the node root file system")
        with ui.status(f"importing root file system as {base}"):
            _import_rootfs(rootfs, base)
    return base


def _import_rootfs(rootfs: Path, image: str) -> None:
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        imported = subprocess.run(["docker", "import", "-", image], stdin=tar.stdout, capture_output=True, text=True)
    finally:
        tar.stdout.close()
        tar.wait()
    if imported.returncode != 0 or tar.returncode != 0:
        raise TrainrigError(f"docker import of the node root file system failed: {imported.stderr.strip()}")
