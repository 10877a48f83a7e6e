"""Local teardown is checked, not assumed: stand-in docker and losetup that can refuse, on PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from infra import inventory, state
from infra.clouds.local.instance import LocalBackend, create_disk_image, disk_file
from infra.errors import TrainrigError
from tests.helpers import make_inventory

# Docker's and losetup's listings live in files; `stuck` names what refuses to go.
STAND_IN = {
    "docker": r"""
import pathlib, sys
root = pathlib.Path({root!r}); args = sys.argv[1:]
def items(kind): return [l for l in (root / kind).read_text().split() if l] if (root / kind).exists() else []
def keep(kind, names): (root / kind).write_text("\n".join(names))
stuck = (root / "stuck").read_text().split() if (root / "stuck").exists() else []
if args[0] == "info": print("27.3.1")
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
