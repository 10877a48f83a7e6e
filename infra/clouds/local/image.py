"""The local cloud's images, each built once and rebuilt only when its definition changes.

- The node image (node_image/): what a fresh cloud VM has: Debian 12, systemd, sshd, python3.
- The job base (job_base/): the stand-in for debian:bookworm-slim that local nodes get in place
  of a public registry, which they cannot reach. It already holds the packages the sample jobs'
  Dockerfiles install (Open MPI, mpi4py, numpy), so their install steps do nothing offline.
"""

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
JOB_BASE = Path(__file__).parent / "job_base" / "packages.txt"
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


def packages(listing: Path = DEFINITION / "packages.txt") -> list[str]:
    return listing.read_text().split()


def ensure_image() -> str:
    """Return the node image tag, building it (and its base) only if it is not cached."""
    image = tag()
    if exists(image):
        return image
    base = _registry_base() or _debootstrap_base(DEFINITION / "packages.txt", "trainrig-rootfs")
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


def ensure_job_base() -> str:
    """The offline stand-in for debian:bookworm-slim, with the sample jobs' packages already in it."""
    return _debootstrap_base(JOB_BASE, "trainrig-job-base")


def _debootstrap_base(listing: Path, name: str) -> str:
    """A Debian 12 root file system from Debian's archive with a package list, imported as an image (no registry)."""
    digest = hashlib.sha256(listing.read_bytes()).hexdigest()[:12]
    base = f"{name}:{digest}"
    if exists(base):
        return base
    if shutil.which("debootstrap") is None:
        raise TrainrigError("no image registry answers and debootstrap is missing: apt-get install -y debootstrap")
    with tempfile.TemporaryDirectory(prefix="trainrig-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        include = ",".join(packages(listing))
        argv = ["debootstrap", "--variant=minbase", f"--include={include}", "bookworm", rootfs, MIRROR]
        with ui.status(f"debootstrap: Debian 12 root file system for {name} from Debian's archive") as show:
            stream(argv, show, timeout=1800, what=f"debootstrap of {name}")
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
