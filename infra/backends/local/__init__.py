"""The local cloud: Docker containers that behave like VMs (systemd, sshd, a data disk, shared storage)."""

from infra.backends.local.instance import LocalBackend

BACKEND = LocalBackend()
