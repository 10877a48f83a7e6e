"""The bad-input corpus (tests/cases/bad_input.yaml): every case a real `fab` process, one line, nothing made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_inventory

ROOT = Path(__file__).resolve().parents[1]
FAB = Path(sys.executable).parent / "fab"
CASES = yaml.safe_load((ROOT / "tests" / "cases" / "bad_input.yaml").read_text())
# What reaches nodes or clouds: a call to any of them means the command went too far.
OUTSIDE = ("docker", "pulumi", "ssh", "scp", "ansible-playbook", "losetup")
STAND_IN = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
echo "stand-in $(basename "$0"): not to be called" >&2
exit 1
"""


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    elif path.suffix == ".json":
        path.write_text(json.dumps(content))
    else:
        path.write_text(yaml.safe_dump(content))


def _inventory(home: Path, spec: dict) -> None:
    data = make_inventory(cluster=spec["cluster"]).model_dump(mode="json")
    for dotted, value in (spec.get("set") or {}).items():
        *parents, last = dotted.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    _write(home / "clusters" / spec["cluster"] / "inventory.json", data)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file and link under home/ and work/ with its content (lock files are not state)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] not in ("home", "work") or "locks" in rel.parts:
            continue
        if path.is_symlink():
            found[str(rel)] = os.readlink(path).encode()
        elif path.is_file():
            found[str(rel)] = path.read_bytes()
        else:
            found[str(rel)] = b"<dir>"
    return found


def run_case(case: dict, tmp: Path) -> tuple[subprocess.CompletedProcess, dict, dict, str]:
    bin_dir, log = tmp / "bin", tmp / "outside.log"
    bin_dir.mkdir(parents=True)
    for name in OUTSIDE:
        script = bin_dir / name
        script.write_text(STAND_IN.format(log=log))
        script.chmod(0o755)
    (tmp / "home").mkdir()
    (tmp / "work").mkdir()
    if case.get("inventory"):
        _inventory(tmp / "home", case["inventory"])
    for rel, content in (case.get("files") or {}).items():
        _write(tmp / rel, content)
    for rel, target in (case.get("links") or {}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).symlink_to(target)
    env = {
        **os.environ,
        "TRAINRIG_HOME": str(tmp / "home"),
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "DOCKER_HOST": f"unix://{tmp}/no-engine.sock",
        "PYTHONDONTWRITEBYTECODE": "1",
        **(case.get("env") or {}),
    }
    before = _snapshot(tmp)
    result = subprocess.run(
        [str(FAB), "-r", str(ROOT), *case["argv"]],
        cwd=tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, before, _snapshot(tmp), log.read_text() if log.exists() else ""


@cache
def _results(base: Path) -> dict[str, tuple]:
    """All cases at once, a few processes at a time (each `fab` spends most of a second starting)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {c["case"]: pool.submit(run_case, c, base / f"case{i:02d}") for i, c in enumerate(CASES)}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(tmp_path_factory.mktemp("bad-input"))


def test_the_corpus_is_wide_enough():
    assert len(CASES) >= 40
    assert len({c["case"] for c in CASES}) == len(CASES), "case names are unique"


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_bad_input_is_one_line_and_makes_nothing(results, case):
    result, before, after, outside = results[case["case"]]
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert case["error"] in lines[0], lines[0]
    assert result.returncode == case.get("exit", 2), output
    assert after == before, "nothing created or changed"
    assert outside == "", f"reached a node or a cloud: {outside}"
