"""SSH key pairs that trainrig generates: the cluster's login key and each local node's host key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from infra import state


@dataclass(frozen=True)
class KeyPair:
    private_openssh: str
    public_openssh: str  # "ssh-ed25519 AAAA..."


def generate(comment: str = "") -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return KeyPair(private, f"{public} {comment}".strip())


def ensure_login_key(path: Path, comment: str) -> str:
    """The cluster's login key (created once, owner-only); returns its public line."""
    pub = path.with_suffix(".pub")
    if not (path.is_file() and pub.is_file()):
        pair = generate(comment)
        state.write_private(path, pair.private_openssh)
        pub.write_text(pair.public_openssh + "\n")
    return pub.read_text().strip()


def bare(public_line: str) -> str:
    """'ssh-ed25519 AAAA... comment' -> 'ssh-ed25519 AAAA...' (what known_hosts pins)."""
    kind, blob = public_line.split()[:2]
    return f"{kind} {blob}"
