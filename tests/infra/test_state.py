"""The operator's state: one change of a cluster at a time, run records never lost."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster import runs
from infra import inventory, state
from infra.errors import TrainrigError
from tests.cluster.test_runs import record
from tests.helpers import make_inventory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _remember(index: int) -> None:
    runs._remember("unit", record(f"job-{index:02d}", minutes=index))


def test_twelve_threads_remembering_runs_at_once_keep_all_twelve():
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(_remember, range(12)))
    assert sorted(r.id for r in runs.records("unit")) == [f"job-{i:02d}" for i in range(12)]


def test_twelve_processes_remembering_runs_at_once_keep_all_twelve():
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_remember, args=(i,)) for i in range(12)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * 12
    assert sorted(r.id for r in runs.records("unit")) == [f"job-{i:02d}" for i in range(12)]


def test_a_second_change_of_a_cluster_fails_at_once_naming_the_first():
    with state.cluster_lock("unit", "up"), pytest.raises(TrainrigError) as err, state.cluster_lock("unit", "down"):
        pass
    assert str(err.value) == (
        f"cluster unit is busy (pid {os.getpid()}: fab up); wait for it to finish, or stop that command first"
    )
    with state.cluster_lock("unit", "down"):  # released: the next change goes ahead
        pass


def fab(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINRIG_HOME": str(home)}
    argv = [str(Path(sys.executable).parent / "fab"), *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["up", "--name", "unit"], ["down", "--name", "unit", "--purge"]])
def test_fab_up_or_down_of_a_busy_cluster_is_one_line_and_changes_nothing(home, command):
    if command[0] == "down":
        inventory.save(make_inventory())
    before = sorted(p.relative_to(home) for p in home.rglob("*") if "locks" not in p.parts)
    with state.cluster_lock("unit", "provision"):
        result = fab(*command, home=home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: cluster unit is busy (pid {os.getpid()}: fab provision); wait for it to finish, "
        "or stop that command first"
    ]
    assert sorted(p.relative_to(home) for p in home.rglob("*") if "locks" not in p.parts) == before


# TRAINRIG_HOME and the files under it


def test_an_empty_trainrig_home_is_refused_not_read_as_the_current_folder(monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", "")
    with pytest.raises(TrainrigError, match=r"^TRAINRIG_HOME is set but empty: unset it"):
        state.home()


def test_trainrig_home_is_expanded_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "operator"))
    monkeypatch.setenv("TRAINRIG_HOME", "~/state")
    assert state.home() == tmp_path / "operator" / "state"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINRIG_HOME", "rel/../state")
    assert state.home() == tmp_path / "state"
    inventory.save(make_inventory())
    assert inventory.path_for("unit") == tmp_path / "state" / "clusters" / "unit" / "inventory.json"


def test_state_folders_and_disk_images_are_owner_only(home, monkeypatch):
    from infra.clouds.local.instance import create_disk_image, disk_file

    old = os.umask(0o022)  # the usual umask, which leaves new folders 0755
    try:
        inventory.save(make_inventory())
        create_disk_image(disk_file("unit", "node0"), 1)
    finally:
        os.umask(old)
    for folder in (home, home / "clusters", home / "clusters" / "unit", home / "clusters" / "unit" / "disks"):
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder
    image = disk_file("unit", "node0")
    assert oct(image.stat().st_mode & 0o777) == "0o600"
    assert image.stat().st_size == 1024**3 and image.stat().st_blocks == 0  # sparse


@pytest.mark.parametrize("problem", ["open to others", "someone else's", "a link"])
def test_a_shared_control_socket_folder_is_never_reused(tmp_path, monkeypatch, problem):
    from cluster import provision

    monkeypatch.setattr(provision.tempfile, "gettempdir", lambda: str(tmp_path))
    path = tmp_path / f"trainrig-cp-{os.getuid()}"
    if problem == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir(mode=0o700)
    if problem == "open to others":
        path.chmod(0o777)
    if problem == "someone else's":
        uid = os.getuid()
        monkeypatch.setattr(provision.os, "getuid", lambda: uid + 1)
        path = path.rename(tmp_path / f"trainrig-cp-{uid + 1}")
    with pytest.raises(TrainrigError, match=r"\(SSH connection sharing\) is not a folder that only you own and use"):
        provision.control_dir()


def test_a_fresh_control_socket_folder_is_owner_only(tmp_path, monkeypatch):
    from cluster import provision

    monkeypatch.setattr(provision.tempfile, "gettempdir", lambda: str(tmp_path))
    assert oct(provision.control_dir().stat().st_mode & 0o777) == "0o700"
    assert provision.control_dir() == tmp_path / f"trainrig-cp-{os.getuid()}"  # ours: reused
