"""Local teardown is checked, not assumed: stand-in docker and losetup that can refuse, on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra import inventory, state
from infra.clouds.local import reaper
from infra.clouds.local.instance import LocalBackend, create_disk_image, disk_file
from infra.errors import TrainrigError
from tests.helpers import make_inventory

# Docker's and losetup's listings live in files; `stuck` names what refuses to go.
STAND_IN = {
    "docker": r"""
import json, pathlib, sys
root = pathlib.Path({root!r}); args = sys.argv[1:]
def items(kind): return [l for l in (root / kind).read_text().split() if l] if (root / kind).exists() else []
def keep(kind, names): (root / kind).write_text("\n".join(names))
stuck = (root / "stuck").read_text().split() if (root / "stuck").exists() else []
stopped = items("stopped")
ports = dict(p.split("=") for p in items("ports"))
if args[0] == "info": print("27.3.1")
elif args[0] == "inspect":
    name = args[1]
    if name not in items("container"): sys.exit("Error: No such object: " + name)
    node = name.rsplit("-", 1)[1]
    print(json.dumps([{{
        "State": {{"Running": name not in stopped}},
        "HostConfig": {{"Devices": [{{"PathOnHost": "/dev/loop7"}}] if node == "node0" else None}},
        "NetworkSettings": {{
            "Networks": {{"trainrig-unit": {{"IPAddress": "10.9.0." + str(20 + len(node))}}}},
            "Ports": {{"22/tcp": [{{"HostPort": ports.get(name, "2200")}}]}},
        }},
    }}]))
elif args[0] == "start":
    keep("stopped", [n for n in stopped if n != args[1]])
    ports[args[1]] = str(int(ports.get(args[1], "2200")) + 30000)
    keep("ports", [f"{{k}}={{v}}" for k, v in ports.items()])
elif args[1:2] == ["ls"]: print("\n".join(items(args[0])))
elif args[0] == "rm": keep("container", [c for c in items("container") if c not in args or c in stuck])
elif args[1:2] == ["inspect"]: sys.exit(0 if args[2] in items(args[0]) else 1)
elif args[1:2] == ["rm"]: keep(args[0], [n for n in items(args[0]) if n not in args or n in stuck])
""",
    "losetup": r"""
import pathlib, sys
root = pathlib.Path({root!r}); args = sys.argv[1:]
loops = dict(l.split("=", 1) for l in (root / "loops").read_text().split() if l) if (root / "loops").exists() else {{}}
stuck = (root / "stuck").read_text().split() if (root / "stuck").exists() else []
if args[0] == "--associated": print("\n".join(d for d, f in loops.items() if f == args[1]))
elif args[0] == "--detach":
    if args[1] in stuck: sys.exit("losetup: " + args[1] + ": detach failed: Device or resource busy")
    loops.pop(args[1], None)
    (root / "loops").write_text("\n".join(f"{{d}}={{f}}" for d, f in loops.items()))
else:  # losetup LOOP FILE: attach FILE at LOOP
    loops[args[0]] = args[1]
    (root / "loops").write_text("\n".join(f"{{d}}={{f}}" for d, f in loops.items()))
""",
}


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """A cluster 'unit' with two node containers, a network, a volume and a data disk attached as /dev/loop7."""
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
    root = tmp_path / "engine"
    (root / "bin").mkdir(parents=True)
    for name, body in STAND_IN.items():
        script = root / "bin" / name
        script.write_text(f"#!{sys.executable}\n" + body.format(root=str(root)))
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    inventory.save(make_inventory())
    disk = disk_file("unit", "node0")
    create_disk_image(disk, 1)
    (root / "container").write_text("trainrig-unit-node0 trainrig-unit-storage")
    (root / "network").write_text("trainrig-unit")
    (root / "volume").write_text("trainrig-unit-shared")
    (root / "loops").write_text(f"/dev/loop7={disk}")
    return root


def stuck(engine: Path, *names: str) -> None:
    (engine / "stuck").write_text(" ".join(names))


def test_a_purge_whose_loop_device_will_not_detach_keeps_the_image_and_says_so(engine):
    stuck(engine, "/dev/loop7")
    with pytest.raises(TrainrigError, match=r"left: loop device /dev/loop7; run fab down --name unit --purge again$"):
        LocalBackend().destroy(inventory.load("unit"), purge=True)
    assert disk_file("unit", "node0").exists()  # still there to find the loop device by, next time


def test_a_down_whose_node_survives_is_an_error_not_a_success(engine):
    stuck(engine, "trainrig-unit-node0")
    with pytest.raises(TrainrigError, match=r"left: container trainrig-unit-node0; run fab down --name unit again$"):
        LocalBackend().destroy(inventory.load("unit"), purge=False)


def test_a_clean_down_keeps_disk_and_volume_and_a_clean_purge_leaves_nothing(engine):
    remaining = LocalBackend().destroy(inventory.load("unit"), purge=False)
    assert remaining is not None and not remaining.nodes
    assert [r.name for r in remaining.retained] == ["node0.img", "trainrig-unit-shared"]
    assert LocalBackend().destroy(remaining, purge=True) is None
    assert not disk_file("unit", "node0").exists()
    assert (engine / "volume").read_text() == "" and (engine / "loops").read_text() == ""
    assert state.cluster_dir("unit").is_dir()  # the folder itself is lifecycle.down's to remove


def test_a_local_node_gets_only_the_capabilities_it_needs():
    from infra.clouds.local.instance import DOCKER_DEFAULT_CAPS, VM_OPTIONS

    options = list(VM_OPTIONS)
    assert options[:2] == ["--cap-drop", "ALL"] and "--privileged" not in options
    added = {options[i + 1] for i, arg in enumerate(options) if arg == "--cap-add"}
    assert added == {*DOCKER_DEFAULT_CAPS, "SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"}
    assert not {"ALL", "SYS_MODULE", "SYS_RAWIO", "SYS_BOOT", "SYS_TIME", "SYS_RESOURCE", "MAC_ADMIN"} & added
    # /proc/sys and the other system paths keep Docker's masks; only IP forwarding is set, per node.
    assert "systempaths=unconfined" not in options
    assert options[options.index("--sysctl") + 1] == "net.ipv4.ip_forward=1"


class Board:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def update(self, node: str, text: str) -> None:
        self.lines.append((node, text))


def test_nodes_stopped_by_a_host_restart_come_back_with_their_disk_and_keys(engine, monkeypatch):
    waited, remounted, watched = [], [], []
    monkeypatch.setattr(LocalBackend, "wait_ready", lambda self, inv, board: waited.append(inv.cluster))
    monkeypatch.setattr(LocalBackend, "_remount", lambda self, inv, node, board: remounted.append(node.name))
    monkeypatch.setattr(reaper, "start", watched.append)
    before = inventory.load("unit")
    (engine / "container").write_text(" ".join(f"trainrig-unit-{n.name}" for n in before.nodes))
    (engine / "ports").write_text(" ".join(f"trainrig-unit-{n.name}={n.ssh_port}" for n in before.nodes))
    (engine / "stopped").write_text("trainrig-unit-node0 trainrig-unit-node1")
    (engine / "loops").write_text("")  # a restarted host has no loop devices attached
    after, done = LocalBackend().reconcile(before, Board())
    assert done == [
        "node0: now at 127.0.0.1:32200 (10.9.0.25), was :2200",
        "node0: started",
        "node1: now at 127.0.0.1:32201 (10.9.0.25), was :2201",
        "node1: started",
        "storage: now at 127.0.0.1:2202 (10.9.0.27), was :2202",
    ]
    assert [n.ssh_port for n in after.nodes] == [32200, 32201, 2202]
    assert [n.host_key for n in after.nodes] == [n.host_key for n in before.nodes]  # still pinned
    assert inventory.load("unit") == after
    assert "[127.0.0.1]:32200 ssh-ed25519 " in inventory.known_hosts_path("unit").read_text()
    assert (engine / "loops").read_text() == f"/dev/loop7={disk_file('unit', 'node0')}"
    assert waited == ["unit"] and sorted(remounted) == ["node0", "node1"] and watched == ["unit"]


def test_a_node_whose_container_is_gone_cannot_be_brought_back(engine):
    before = inventory.load("unit")  # the engine lists node0 and storage only: node1 was removed
    with pytest.raises(TrainrigError, match=r"^node1 of 'unit' is gone \(no container trainrig-unit-node1\); remove"):
        LocalBackend().reconcile(before, Board())
    assert inventory.load("unit") == before


def test_the_hosts_inotify_limit_is_raised_for_many_nodes_and_left_alone_when_enough(tmp_path, capsys):
    from infra.clouds.local import engine as engine_mod

    limit = tmp_path / "max_user_instances"
    limit.write_text("128\n")
    engine_mod.ensure_inotify_instances(3, limit)
    assert limit.read_text() == "128\n"  # 3 nodes fit
    engine_mod.ensure_inotify_instances(34, limit)
    assert int(limit.read_text()) == 34 * engine_mod.INOTIFY_PER_NODE
    assert "raised fs.inotify.max_user_instances from 128" in capsys.readouterr().out


def test_an_inotify_limit_that_cannot_be_raised_is_one_line_with_the_command(tmp_path):
    from infra.clouds.local import engine as engine_mod

    class ReadOnly(type(Path())):  # a limit the operator may read but not change (not root)
        def write_text(self, *args, **kwargs):
            raise PermissionError("read-only")

    limit = ReadOnly(tmp_path / "max_user_instances")
    Path(limit).write_text("128\n")
    with pytest.raises(TrainrigError, match=r"34 local nodes need .* allows 128: run sysctl -w fs.inotify"):
        engine_mod.ensure_inotify_instances(34, limit)


def test_a_node_that_stops_as_it_boots_is_named_with_its_last_words(monkeypatch):
    from infra.clouds.local import instance

    exited = {"State": {"Status": "exited"}, "NetworkSettings": {"Ports": {}, "Networks": {}}}

    def fake_run(argv, **kwargs):
        out = json.dumps([exited]) if argv[1] == "inspect" else ""
        err = "Failed to allocate manager object: Too many open files" if argv[1] == "logs" else ""
        return subprocess.CompletedProcess(argv, 0, out, err)

    monkeypatch.setattr(instance, "run", fake_run)
    with pytest.raises(TrainrigError) as caught:
        LocalBackend()._addresses("big", "node7")
    assert str(caught.value) == (
        "node7 did not stay up (container exited; its last words: Failed to allocate manager object: "
        "Too many open files): see docker logs trainrig-big-node7"
    )
