"""fab tensorboard against in-process sshds: a stand-in docker serves the run's log folder over HTTP on loopback.

The stand-in plays the job's image: it holds python3 and sh but no tensorboard, and it starts
the tensorboard.command on this machine, as host networking would on a node. The tunnel, the
readiness wait, the loopback-only check and the clean-up are the real ones.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from cluster import tensorboard
from cluster.runs import RunRecord
from infra.errors import TrainrigError

STAND_IN = """#!{python}
import json, os, signal, subprocess, sys
state = {state!r}
args = sys.argv[1:]
with open(os.path.join(state, "docker.log"), "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:2] == ["run", "--rm"]:  # the image's PATH: python3 and sh, no tensorboard
    sys.exit(0 if args[-1] in ("python3", "sh") else 1)
if args[:2] == ["run", "-d"]:
    name, entry = args[args.index("--name") + 1], args[args.index("--entrypoint") + 1]
    rest = args[args.index("--entrypoint") + 3:]
    server = subprocess.Popen([entry, *rest], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    open(os.path.join(state, name + ".pid"), "w").write(str(server.pid))
    print("0123456789ab")
elif args[0] == "inspect":
    pid = os.path.join(state, args[-1] + ".pid")
    try:
        os.kill(int(open(pid).read()), 0)
        print("true")
    except (OSError, ValueError):
        print("false")
elif args[:2] == ["rm", "-f"]:
    pid = os.path.join(state, args[-1] + ".pid")
    if os.path.exists(pid):
        try:
            os.killpg(int(open(pid).read()), signal.SIGKILL)
        except OSError:
            pass
        os.unlink(pid)
"""

HTTP_SERVER = ["python3", "-m", "http.server", "--bind", "{host}", "--directory", "{tensorboard_dir}", "{port}"]


def a_run(ssh_cluster, tmp_path, board: dict | None) -> tuple:
    cluster = ssh_cluster(1)
    state = tmp_path / "docker-state"
    state.mkdir()
    docker = cluster.bin_dir / "docker"
    docker.write_text(STAND_IN.format(python=sys.executable, state=str(state)))
    docker.chmod(0o755)
    run_dir = cluster.share / "trainrig" / "runs" / "tb-1"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "tb" / "events.out.tfevents.1").write_text("an event file\n")
    spec = {"name": "tb", "image": {"pull": "example.org/tb:1"}, "command": ["train"], "nodes": 1}
    if board is not None:
        spec["tensorboard"] = board
    (run_dir / "job.yaml").write_text(yaml.safe_dump(spec))
    record = RunRecord(
        id="tb-1",
        job="tb",
        node="node0",
        run_dir=str(run_dir),
        ranks=1,
        max_steps=None,
        started_at=datetime.now(UTC),
        nodes=["node0"],
        image="sha256:" + "ab" * 32,
    )
    return cluster, record, state


def listeners(port: int) -> list[str]:
    """The addresses this machine listens on at port, as /proc/net/tcp writes them."""
    out = subprocess.run([sys.executable, "-c", tensorboard.LISTENERS, str(port)], capture_output=True, text=True)
    return out.stdout.split()


def docker_calls(state: Path) -> list[list[str]]:
    return [json.loads(line) for line in (state / "docker.log").read_text().splitlines()]


def test_tensorboard_answers_through_the_tunnel_on_loopback_only(ssh_cluster, tmp_path):
    cluster, record, state = a_run(ssh_cluster, tmp_path, {"logdir": "tb", "command": HTTP_SERVER})
    with tensorboard.serving(cluster.inv, record, 0) as served:
        assert served.url == f"http://127.0.0.1:{served.local_port}/"
        with urllib.request.urlopen(served.url + "events.out.tfevents.1", timeout=10) as answer:
            assert answer.read() == b"an event file\n"
        # Both ends listen on loopback only: here, and on the node.
        assert listeners(served.local_port) == ["0100007F"]
        assert listeners(served.node_port) == ["0100007F"]
        started = next(c for c in docker_calls(state) if c[:2] == ["run", "-d"])
        assert started[started.index("--network") + 1] == "host" and started[-1] == str(served.node_port)
        assert f"{record.run_dir}/tb" in started and "127.0.0.1" in started
    # Leaving closes the tunnel and removes the server.
    assert listeners(served.local_port) == [] and listeners(served.node_port) == []
    assert ["rm", "-f", served.container] in docker_calls(state)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.local_port), timeout=2)


def test_a_server_that_listens_beyond_loopback_is_refused_and_removed(ssh_cluster, tmp_path):
    everywhere = ["sh", "-c", 'exec python3 -m http.server --bind 0.0.0.0 "$1"', "{host}", "{port}"]
    cluster, record, state = a_run(ssh_cluster, tmp_path, {"logdir": "tb", "command": everywhere})
    with pytest.raises(TrainrigError) as exc, tensorboard.serving(cluster.inv, record, 0):
        pass
    assert str(exc.value).startswith("node0: the TensorBoard command listens beyond 127.0.0.1; give it {host}")
    started = next(c for c in docker_calls(state) if c[:2] == ["run", "-d"])
    assert ["rm", "-f", started[started.index("--name") + 1]] in docker_calls(state)
    assert listeners(int(started[-1])) == []


def test_an_image_without_tensorboard_is_refused_before_anything_starts(ssh_cluster, tmp_path):
    cluster, record, state = a_run(ssh_cluster, tmp_path, {"logdir": "tb"})
    with pytest.raises(TrainrigError) as exc, tensorboard.serving(cluster.inv, record, 0):
        pass
    assert str(exc.value) == (
        "job 'tb''s image has no tensorboard on its PATH; add TensorBoard to the image (pip install tensorboard)"
        " or set tensorboard.command to the server it has"
    )
    assert not [c for c in docker_calls(state) if c[:2] == ["run", "-d"]]


def test_a_job_without_a_tensorboard_block_says_what_to_add(ssh_cluster, tmp_path):
    cluster, record, state = a_run(ssh_cluster, tmp_path, None)
    refused = pytest.raises(TrainrigError, match=r"job 'tb' of run tb-1 has no tensorboard: block; add `tensorboard: ")
    with refused, tensorboard.serving(cluster.inv, record, 0):
        pass


def test_a_local_port_in_use_is_one_line(ssh_cluster, tmp_path):
    cluster, record, state = a_run(ssh_cluster, tmp_path, {"logdir": "tb", "command": HTTP_SERVER})
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refused = pytest.raises(TrainrigError, match=rf"^127.0.0.1:{port} is in use on this machine; pick another port")
        with refused, tensorboard.serving(cluster.inv, record, port):
            pass
    assert not any(server.connections for server in cluster.servers.values())  # refused before reaching the node


def test_fab_tensorboard_serves_until_ctrl_c(ssh_cluster, tmp_path):
    from cluster import runs
    from infra import inventory
    from tests.sshd import free_port

    cluster, record, state = a_run(ssh_cluster, tmp_path, {"logdir": "tb", "command": HTTP_SERVER})
    inventory.save(cluster.inv)
    runs._remember(cluster.inv.cluster, record)
    port = free_port()
    fab = Path(sys.executable).parent / "fab"
    proc = subprocess.Popen(
        [str(fab), "tensorboard", "--name", "unit", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},  # the line unwrapped
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"TensorBoard of tb-1 at http://127.0.0.1:{port}/ (served on node0; Ctrl-C closes it)" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/events.out.tfevents.1", timeout=10) as answer:
            assert answer.read() == b"an event file\n"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "TensorBoard closed" in out and "Traceback" not in err
    started = next(c for c in docker_calls(state) if c[:2] == ["run", "-d"])
    assert ["rm", "-f", started[started.index("--name") + 1]] in docker_calls(state)
    assert listeners(port) == [] and listeners(int(started[-1])) == []
