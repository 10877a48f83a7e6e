"""SSH to cluster nodes with pinned host keys: the one place that opens connections to nodes."""

from __future__ import annotations

import io
import logging
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, TypeVar

import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut

from infra.errors import TrainrigError
from infra.inventory import Inventory, Node

T = TypeVar("T")
KEEPALIVE = 5  # seconds between keepalives on long-lived connections (monitor, logs)
READ_TIMEOUT = 15  # seconds a read from a node may take before it counts as not answering
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
        # A frozen host accepts TCP and then says nothing: the banner and auth waits are bounded too.
        connect_kwargs={
            "key_filename": str(inv.ssh_private_key),
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        },
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


def watched(conn: Connection, node: Node, timeout: float = READ_TIMEOUT):
    """An SFTP session that gives up on a node that stops answering (keepalives, and a bound on every read)."""
    conn.transport.set_keepalive(KEEPALIVE)
    sftp = conn.sftp()
    sftp.get_channel().settimeout(timeout)
    return sftp


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


class _Lines(io.TextIOBase):
    """A stream that hands each complete line to a callback (live progress from a remote command)."""

    def __init__(self, on_line: Callable[[str], None]):
        self.on_line, self.partial = on_line, ""
        self.tail: list[str] = []

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            if line.strip():
                self.tail = (self.tail + [line.rstrip()])[-5:]
                self.on_line(line.rstrip())
        return len(text)


def stream(conn: Connection, argv: Sequence[str], on_line: Callable[[str], None], *, timeout: float, what: str):
    """Run argv on a node, handing each output line to on_line as it comes; a failure names its last line."""
    lines = _Lines(on_line)
    try:
        result = conn.run(
            shlex.join(str(a) for a in argv),
            hide=True,
            warn=True,
            timeout=timeout,
            in_stream=False,
            out_stream=lines,
            err_stream=lines,
        )
    except CommandTimedOut as exc:
        raise TrainrigError(f"{what} did not finish within {timeout:.0f}s") from exc
    if result.exited != 0:
        raise TrainrigError(f"{what} failed: {lines.tail[-1] if lines.tail else f'exit status {result.exited}'}")
    return result


def send(
    conn: Connection,
    argv: Sequence[str],
    source: BinaryIO,
    *,
    timeout: float,
    what: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Pipe a local byte stream into a remote command's standard input (an image into `docker load`)."""
    channel = conn.client.get_transport().open_session(timeout=30)
    channel.settimeout(timeout)
    channel.set_combine_stderr(True)
    channel.exec_command(shlex.join(str(a) for a in argv))
    sent = 0
    try:
        while chunk := source.read(1 << 20):
            channel.sendall(chunk)
            sent += len(chunk)
            if progress:
                progress(sent)
        channel.shutdown_write()
        output = b""
        while data := channel.recv(65536):
            output += data
        code = channel.recv_exit_status()
    except (TimeoutError, OSError) as exc:
        raise TrainrigError(f"{what} stopped: {exc}") from exc
    finally:
        channel.close()
    if code != 0:
        last = output.decode(errors="replace").strip().splitlines()
        raise TrainrigError(f"{what} failed: {last[-1] if last else f'exit status {code}'}")


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
