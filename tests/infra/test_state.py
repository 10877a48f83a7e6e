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
