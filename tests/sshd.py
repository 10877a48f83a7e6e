"""An SSH server in the test process (paramiko, on 127.0.0.1): real handshakes, keys, exec and SFTP, no cluster.

Each Sshd stands for one node. It proves its identity with its own host key, lets in only the
authorized login key, runs an exec request as a real sshd does (the login shell's `sh -c COMMAND`,
so quoting mistakes would show), and serves SFTP on the local filesystem, confined to a root
folder. Its commands run with a PATH that starts with a folder tests can put stand-in programs in.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface

from infra import keys
from infra.inventory import Inventory, Network, Node, SharedStorage


def pkey(pair: keys.KeyPair) -> paramiko.PKey:
    return paramiko.Ed25519Key(file_obj=io.StringIO(pair.private_openssh))


class _Server(paramiko.ServerInterface):
    def __init__(self, sshd: Sshd):
        self.sshd = sshd

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        if key.asbytes() == self.sshd.authorized.asbytes():
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid, origin, destination):
        # A local port forward (ssh -L), as sshd's AllowTcpForwarding permits; here to loopback only.
        if destination[0] != "127.0.0.1":
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        try:
            upstream = socket.create_connection(destination, timeout=5)
        except OSError:
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        self.sshd.forwards[chanid] = upstream
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        self.sshd.commands.append(command.decode())
        threading.Thread(target=self.sshd.execute, args=(channel, command.decode()), daemon=True).start()
        return True


class _Handle(SFTPHandle):
    def stat(self):
        return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))

    def chattr(self, attr):
        """A mode set on an open file (transfer.put_private makes a file private before writing it)."""
        if attr.st_mode is not None:
            os.fchmod(self.readfile.fileno(), attr.st_mode & 0o7777)
        return paramiko.SFTP_OK


class LocalSftp(SFTPServerInterface):
    """SFTP on the local filesystem: remote paths are local paths; reading and writing refused outside `root`."""

    def __init__(self, server, root: Path, *args, **kwargs):
        super().__init__(server, *args, **kwargs)
        self.root = root.resolve()

    def _local(self, path) -> str | None:
        path = os.path.realpath(path if isinstance(path, str) else path.decode())
        return path if path == str(self.root) or path.startswith(str(self.root) + os.sep) else None

    def _call(self, path, action):
        local = self._local(path)
        if local is None:
            return paramiko.SFTP_PERMISSION_DENIED
        try:
            return action(local)
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    def list_folder(self, path):
        def listing(local):
            return [SFTPAttributes.from_stat(os.lstat(os.path.join(local, name)), name) for name in os.listdir(local)]

        return self._call(path, listing)

    # Looking is allowed anywhere, as on a real node (a client making parents stats / and /tmp).
    def stat(self, path):
        return self._look(path, os.stat)

    def lstat(self, path):
        return self._look(path, os.lstat)

    def _look(self, path, how):
        try:
            return SFTPAttributes.from_stat(how(path if isinstance(path, str) else path.decode()))
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    def open(self, path, flags, attr):
        def opened(local):
            fd = os.open(local, flags, 0o644)
            if flags & os.O_WRONLY:
                mode = "ab" if flags & os.O_APPEND else "wb"
            elif flags & os.O_RDWR:
                mode = "a+b" if flags & os.O_APPEND else "r+b"
            else:
                mode = "rb"
            handle = _Handle(flags)
            handle.filename = local
            handle.readfile = handle.writefile = os.fdopen(fd, mode)
            return handle

        return self._call(path, opened)

    def _ok(self, path, action):
        def done(local):
            action(local)
            return paramiko.SFTP_OK

        return self._call(path, done)

    def mkdir(self, path, attr):
        return self._ok(path, os.mkdir)

    def rmdir(self, path):
        return self._ok(path, os.rmdir)

    def remove(self, path):
        return self._ok(path, os.remove)

    def chattr(self, path, attr):
        return self._ok(path, lambda local: None)


@dataclass
class Sshd:
    """One node's sshd on 127.0.0.1:port, with its host key and the one login key it lets in."""

    host: keys.KeyPair
    login: keys.KeyPair
    root: Path
    bin_dir: Path
    port: int = 0
    commands: list[str] = field(default_factory=list)
    forwards: dict[int, socket.socket] = field(default_factory=dict)  # channel id -> its connection on loopback

    def __post_init__(self):
        self.authorized = pkey(self.login)
        self._host_key = pkey(self.host)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._transports: list[paramiko.Transport] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """How many clients have connected (a test can tell a node that was never touched)."""
        return len(self._transports)

    @property
    def host_key(self) -> str:
        return keys.bare(self.host.public_openssh)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:  # stop() shut the listener down
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(self._host_key)
            transport.set_subsystem_handler("sftp", SFTPServer, LocalSftp, root=self.root)
            self._transports.append(transport)
            try:
                transport.start_server(server=_Server(self))
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()
                continue
            threading.Thread(target=self._forward, args=(transport,), daemon=True).start()

    def _forward(self, transport: paramiko.Transport) -> None:
        """Channels opened for a port forward carry bytes to and from their loopback connection."""
        while transport.is_active() and not self._stopping.is_set():
            channel = transport.accept(timeout=0.5)
            upstream = self.forwards.pop(channel.get_id(), None) if channel else None
            if channel is None or upstream is None:
                continue  # a session channel: its exec request runs it
            for source, sink in ((channel, upstream), (upstream, channel)):
                threading.Thread(target=_carry, args=(source, sink), daemon=True).start()

    def execute(self, channel: paramiko.Channel, command: str) -> None:
        """What sshd does with an exec request: the login shell runs the command line."""
        env = {**os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, channel.sendall), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, channel.sendall_stderr), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        while proc.poll() is None:
            if channel.closed or self._stopping.is_set():  # the client gave up (a timeout): end the command
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
        for pump in pumps:
            pump.join(timeout=5)
        if not channel.closed:
            channel.send_exit_status(proc.returncode)
            channel.close()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in _serve
        except OSError:
            pass
        self._listener.close()
        for transport in self._transports:
            transport.close()
        self._thread.join(timeout=5)


def _pump(stream, send) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        try:
            send(chunk)
        except OSError:  # the channel is gone; keep draining so the command is not blocked
            pass


def _carry(source, sink) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.close()
        except OSError:
            pass


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


@dataclass
class SshCluster:
    """Nodes served by in-process sshds, and the inventory that pins their host keys."""

    inv: Inventory
    servers: dict[str, Sshd]
    share: Path  # the shared storage's mount point (the same folder for every node, as NFS makes it)
    bin_dir: Path  # stand-in programs every node finds first on its PATH

    def add_program(self, name: str, script: str) -> Path:
        path = self.bin_dir / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
        return path


GUARDED = ("systemd-run", "systemctl", "mpirun", "docker")


def start_cluster(tmp: Path, gpu_nodes: int, cluster: str = "unit") -> SshCluster:
    """gpu_nodes GPU nodes and a storage node, each its own sshd, the login key saved under tmp."""
    tmp.mkdir(parents=True, exist_ok=True)
    login = keys.generate("trainrig")
    key_file = tmp / "id_ed25519"
    key_file.write_text(login.private_openssh)
    key_file.chmod(0o600)
    share = tmp / "share"
    share.mkdir()
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for program in GUARDED:  # never the host's own: a test that needs one puts its stand-in here
        (bin_dir / program).write_text(f"#!/bin/sh\necho 'stand-in {program}: not expected here' >&2\nexit 97\n")
        (bin_dir / program).chmod(0o755)
    names = [*(f"node{i}" for i in range(gpu_nodes)), "storage"]
    servers = {name: Sshd(host=keys.generate(), login=login, root=tmp, bin_dir=bin_dir) for name in names}
    nodes = [
        Node(
            name=name,
            role="storage" if name == "storage" else "gpu",
            public_address="127.0.0.1",
            private_address=f"10.9.0.{10 + i}",
            ssh_port=server.port,
            host_key=server.host_key,
            gpu_count=0,
            cpus=2,
            hourly_price_usd=0.0,
        )
        for i, (name, server) in enumerate(servers.items())
    ]
    inv = Inventory(
        cluster=cluster,
        cloud="local",
        ssh_user="root",
        ssh_private_key=key_file,
        nodes=nodes,
        storage=SharedStorage(server="storage", export=str(share), mount_point=str(share)),
        network=Network(name="unit", cidr="10.9.0.0/24"),
    )
    return SshCluster(inv=inv, servers=servers, share=share, bin_dir=bin_dir)
