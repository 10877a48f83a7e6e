"""`fab tensorboard`: TensorBoard in the job's image on the run's first node, reached through an SSH tunnel.

The server runs in a container of the run's own image on the first node, over the run's log
directory on the shared storage, and listens on 127.0.0.1 there: no port of any node is open to
a network. The operator's machine listens on 127.0.0.1 too, and each connection to it becomes an
SSH channel (direct-tcpip) to the server, over the same pinned-key connection every other task
uses. Leaving (Ctrl-C) closes the listener and removes the container.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import paramiko
import yaml
from pydantic import ValidationError

from cluster import jobs
from cluster.runs import RunRecord
from infra import ssh
from infra.commands import wait_until
from infra.errors import TrainrigError
from infra.inventory import Inventory
from infra.models import first_error

HOST = "127.0.0.1"
DEFAULT_PORT = 6006  # TensorBoard's own
READY_TIMEOUT = 120  # TensorBoard reads every event file before it answers
# On the node: a free port on loopback, and the addresses that listen on a given TCP port.
FREE_PORT = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
LISTENERS = """
import sys
port = int(sys.argv[1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        local, state = row.split()[1], row.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            print(address)
"""
LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


def container_name(record: RunRecord, port: int) -> str:
    return f"trainrig-tb-{record.id}-{port}"


def job_spec(sftp, record: RunRecord) -> jobs.JobSpec:
    """The spec the run was started from (job.yaml in its directory)."""
    try:
        with sftp.open(f"{record.run_dir}/job.yaml") as fh:
            data = yaml.safe_load(fh.read())
        return jobs.JobSpec.model_validate(data)
    except FileNotFoundError:
        raise TrainrigError(
            f"run {record.id} has no job.yaml in {record.run_dir}; was the shared storage removed?"
        ) from None
    except (yaml.YAMLError, ValidationError) as exc:
        detail = first_error(exc) if isinstance(exc, ValidationError) else "not valid YAML"
        raise TrainrigError(f"run {record.id}: its job.yaml no longer loads ({detail})") from None


@dataclass
class Served:
    """A TensorBoard being served: where to open it, and the node-side port and container."""

    url: str
    local_port: int
    node: str
    node_port: int
    container: str
    transport: paramiko.Transport

    def wait(self) -> None:
        """Until Ctrl-C, or until the node stops answering (then one line, never a hang)."""
        while self.transport.is_active():
            threading.Event().wait(0.5)
        raise TrainrigError(f"{self.node} stopped answering; TensorBoard closed")


@contextlib.contextmanager
def serving(inv: Inventory, record: RunRecord, local_port: int = DEFAULT_PORT) -> Iterator[Served]:
    """Start TensorBoard for a run and tunnel 127.0.0.1:local_port to it until the block ends (0: any free port)."""
    if record.node not in {n.name for n in inv.nodes}:
        raise TrainrigError(f"{record.node}, the first node of run {record.id}, is not up; TensorBoard runs there")
    if not record.image:
        raise TrainrigError(f"run {record.id} records no image to run TensorBoard in; start a new run first")
    node = inv.node(record.node)
    listener = _listen(local_port)
    with listener, ssh.open_checked(inv, node) as conn:
        spec = job_spec(conn.sftp(), record)
        if spec.tensorboard is None:
            raise TrainrigError(
                f"job {spec.name!r} of run {record.id} has no tensorboard: block; add `tensorboard: "
                "{logdir: tensorboard}` to the job and have it write event files to {tensorboard_dir}"
            )
        program = spec.tensorboard.command[0]
        found = ssh.run(
            conn,
            ["docker", "run", "--rm", "--entrypoint", "sh", record.image, "-c", 'command -v "$1"', "sh", program],
            check=False,
            timeout=120,
        )
        if found.exited != 0:
            raise TrainrigError(
                f"job {spec.name!r}'s image has no {program} on its PATH; add TensorBoard to the image "
                "(pip install tensorboard) or set tensorboard.command to the server it has"
            )
        node_port = int(ssh.run(conn, ["python3", "-c", FREE_PORT], what=f"{node.name}: a free port").stdout)
        name = container_name(record, node_port)
        values = {"tensorboard_dir": f"{record.run_dir}/{spec.tensorboard.logdir}", "host": HOST, "port": node_port}
        command = [arg.format_map(values) for arg in spec.tensorboard.command]
        shared = inv.storage.mount_point if inv.storage else record.run_dir
        ssh.run(
            conn,
            ["mkdir", "-p", values["tensorboard_dir"]],
            what=f"{node.name}: the run's TensorBoard folder",
        )
        ssh.run(
            conn,
            [
                "docker",
                "run",
                "-d",
                "--rm",
                "--name",
                name,
                "--label",
                f"trainrig.tensorboard={record.id}",
                "--network",
                "host",
                "-v",
                f"{shared}:{shared}:ro",
                "--entrypoint",
                command[0],
                record.image,
                *command[1:],
            ],
            timeout=120,
            what=f"{node.name}: starting TensorBoard",
        )
        stop = threading.Event()
        accepting = threading.Thread(target=_accept, args=(listener, conn.transport, node_port, stop), daemon=True)
        try:
            transport = conn.transport
            _ready(conn, transport, node.name, name, node_port)
            public = [a for a in _listening(conn, node_port) if a not in LOOPBACK]
            if public:
                raise TrainrigError(
                    f"{node.name}: the TensorBoard command listens beyond 127.0.0.1; give it {{host}} as the "
                    "address to listen on (tensorboard.command), never 0.0.0.0 or --bind_all"
                )
            accepting.start()
            port = listener.getsockname()[1]
            yield Served(
                url=f"http://{HOST}:{port}/",
                local_port=port,
                node=node.name,
                node_port=node_port,
                container=name,
                transport=transport,
            )
        finally:
            stop.set()
            if accepting.is_alive():
                accepting.join(timeout=5)  # its accept() holds the listener open until it returns
            with contextlib.suppress(Exception):  # the node may be gone: nothing more to stop there
                ssh.run(conn, ["docker", "rm", "-f", name], check=False, timeout=60)


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((HOST, port))  # loopback only: the tunnel is for this machine's browser
    except OSError:
        listener.close()
        raise TrainrigError(f"{HOST}:{port} is in use on this machine; pick another port with --port") from None
    listener.listen(16)
    listener.settimeout(0.5)
    return listener


def _probe(transport: paramiko.Transport, port: int) -> bool:
    """True once an HTTP server answers on the node's 127.0.0.1:port, asked through the tunnel."""
    try:
        channel = transport.open_channel("direct-tcpip", (HOST, port), (HOST, 0), timeout=5)
    except (paramiko.ChannelException, paramiko.SSHException, OSError):
        return False
    try:
        channel.settimeout(10)
        channel.sendall(b"HEAD / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        return channel.recv(12).startswith(b"HTTP/")
    except (OSError, paramiko.SSHException):
        return False
    finally:
        channel.close()


def _ready(conn, transport: paramiko.Transport, node: str, name: str, port: int) -> None:
    def answering() -> bool:
        if _probe(transport, port):
            return True
        running = ssh.run(conn, ["docker", "inspect", "-f", "{{.State.Running}}", name], check=False)
        if running.stdout.strip() != "true":
            raise TrainrigError(f"{node}: TensorBoard stopped before it answered; check the job's tensorboard.command")
        return False

    wait_until(answering, timeout=READY_TIMEOUT, interval=1.0, what=f"TensorBoard to answer on {node}")


def _listening(conn, port: int) -> list[str]:
    return ssh.run(conn, ["python3", "-c", LISTENERS, str(port)]).stdout.split()


def _accept(listener: socket.socket, transport: paramiko.Transport, port: int, stop: threading.Event) -> None:
    """Each connection to the local port becomes a channel to the node's 127.0.0.1:port."""
    while not stop.is_set() and transport.is_active():
        try:
            client, origin = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return  # the listener was closed
        try:
            channel = transport.open_channel("direct-tcpip", (HOST, port), origin, timeout=10)
        except (paramiko.ChannelException, paramiko.SSHException, OSError):
            client.close()
            continue
        threading.Thread(target=_bridge, args=(client, channel), daemon=True).start()


def _bridge(client: socket.socket, channel: paramiko.Channel) -> None:
    """Bytes both ways until both sides have finished; a side that ends its request still gets the answer."""
    upstream = threading.Thread(target=_pump, args=(client, channel, channel.shutdown_write), daemon=True)
    upstream.start()
    _pump(channel, client, lambda: client.shutdown(socket.SHUT_WR))
    upstream.join(timeout=60)
    for end in (client, channel):
        with contextlib.suppress(OSError):
            end.close()


def _pump(source, sink, finished) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        finished()
    except OSError:
        with contextlib.suppress(OSError):
            source.close()
            sink.close()
