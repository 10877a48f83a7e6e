"""SSH to cluster nodes with pinned host keys: the one place that opens connections to nodes."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut

from infra.errors import TrainrigError
from infra.inventory import Inventory, Node

T = TypeVar("T")
# Paramiko logs a traceback for every refused attempt while a node boots; our waits report instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


def pinned_client(inv: Inventory) -> paramiko.SSHClient:
    """An SSH client that knows only the inventory's host keys and refuses any other."""
    client = paramiko.SSHClient()
    pinned = client.get_host_keys()
    for line in inv.known_hosts_lines():
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        for name in entry.hostnames:
            pinned.add(name, entry.key.get_name(), entry.key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def connect(inv: Inventory, node: Node, timeout: float = 10) -> Connection:
    # Fabric trusts any host key by default (AutoAddPolicy) and reads ~/.ssh/config: we do neither.
    conn = Connection(
        host=node.public_address,
        port=node.ssh_port,
        user=inv.ssh_user,
        config=Config(overrides={"load_ssh_configs": False}),
        connect_timeout=int(timeout),
        connect_kwargs={"key_filename": str(inv.ssh_private_key), "look_for_keys": False, "allow_agent": False},
    )
    conn.client = pinned_client(inv)
    return conn


def open_checked(inv: Inventory, node: Node, timeout: float = 10) -> Connection:
    """A connected Connection, or a one-line error that tells unreachable from an impostor."""
    conn = connect(inv, node, timeout)
    try:
        conn.open()
    except paramiko.BadHostKeyException as exc:
        raise TrainrigError(
            f"{node.name}: host key does not match the pinned key in the inventory; refusing to connect"
        ) from exc
    except paramiko.AuthenticationException as exc:
        raise TrainrigError(f"{node.name}: the cluster key {inv.ssh_private_key} was refused") from exc
    except (TimeoutError, paramiko.SSHException, OSError) as exc:
        raise TrainrigError(f"{node.name} unreachable at {node.public_address}:{node.ssh_port}: {exc}") from exc
    return conn


def reachable(inv: Inventory, node: Node, timeout: float = 5) -> bool:
    try:
        open_checked(inv, node, timeout).close()
        return True
    except TrainrigError:
        return False


def run(conn: Connection, argv: Sequence[str], *, timeout: float = 60, check: bool = True, what: str | None = None):
    """Run argv on a node (quoted for its shell, never glued from pieces); errors name the node."""
    command = shlex.join(str(a) for a in argv)
    try:
        result = conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)
    except CommandTimedOut as exc:
        raise TrainrigError(f"{conn.host}:{conn.port}: {what or argv[0]} did not finish within {timeout:.0f}s") from exc
    if check and result.exited != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise TrainrigError(
            f"{conn.host}:{conn.port}: {what or argv[0]} failed: {detail[-1] if detail else result.exited}"
        )
    return result


def on_nodes(nodes: Sequence[Node], work: Callable[[Node], T]) -> dict[str, T]:
    """Do work on every node at once (N hosts take the time of one)."""
    if not nodes:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
        futures = {n.name: pool.submit(work, n) for n in nodes}
        return {name: f.result() for name, f in futures.items()}


def on_nodes_by_name(names: Sequence[str], work: Callable[[str], T]) -> dict[str, T]:
    """Like on_nodes, for work that creates the nodes (so there is no Node yet)."""
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(names)))) as pool:
        futures = {name: pool.submit(work, name) for name in names}
        return {name: f.result() for name, f in futures.items()}
