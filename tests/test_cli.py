"""The `fab` command line: every task listed with help, and bad input gives one line, no traceback."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAB = Path(sys.executable).parent / "fab"
TASKS = [
    "audit",
    "bake",
    "cancel",
    "cost",
    "deadman",
    "demo",
    "down",
    "fetch",
    "logs",
    "monitor",
    "park",
    "plan",
    "plot",
    "provision",
    "scaling",
    "status",
    "tensorboard",
    "train",
    "up",
]


def fab(*args, home: Path, path: str | None = None):
    env = {**os.environ, "TRAINRIG_HOME": str(home)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([str(FAB), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, text):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert text in lines[0]


def test_every_task_listed_with_help(tmp_path):
    result = fab("--list", home=tmp_path)
    assert result.returncode == 0
    for name in TASKS:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split()) > 2, f"{name} has no help line"


def test_every_flag_has_help(tmp_path):
    for name in TASKS:
        text = fab("--help", name, home=tmp_path).stdout
        options = [line for line in text.splitlines() if line.strip().startswith("-")]
        assert options and all(len(opt.split(None, 1)) == 2 for opt in options), f"{name}: {options}"
        # A short flag is a dash and a letter; "--=STRING" (invoke's pick of "_") is no flag a user could type.
        assert not [opt for opt in options if re.search(r"(^|\s)--?[=_]", opt)], f"{name}: {options}"


@pytest.mark.parametrize(
    "args, text",
    [
        (["train", "--job", "training_jobs/nope.yaml"], "job file training_jobs/nope.yaml does not exist"),
        (["train", "--job", "tests/cluster/cases/job_specs.yaml"], "expected a mapping of job settings"),
        (
            ["train", "--job", "training_jobs/dp-mlp.yaml"],
            "no cluster named 'dev' (no clusters exist yet); create it with: fab up --name dev",
        ),
        (["status", "--name", "nope"], "no cluster named 'nope'"),
        (["monitor", "--name", "Bad_Name"], "--name 'Bad_Name': give a cluster name of 1-31 lowercase letters"),
        (["up", "--nodes", "abc"], "--nodes 'abc': give a whole number, e.g. --nodes 2"),
        (["demo", "--nodes", "abc"], "--nodes 'abc': give a whole number, e.g. --nodes 2"),
        (["monitor", "--timeout", "abc"], "--timeout 'abc': give a number of seconds above 0"),
        # An empty name is never the default cluster: `down --name '' --purge` must not remove 'dev'.
        (["down", "--name", "", "--purge"], "--name '': give a cluster name"),
        (["demo", "--name", ""], "--name '': give a cluster name"),
        (["up", "--nodes", "0"], "--nodes 0: Input should be greater than or equal to 1"),
        (["provision", "--name", "ghost"], "create it with: fab up --name ghost"),
        (["scaling", "--job", "training_jobs/dp-mlp.yaml", "--nodes", "2,1"], "--nodes '2,1': give increasing"),
        (["scaling", "--job", "training_jobs/dp-mlp.yaml", "--nodes", "one"], "--nodes 'one': give node counts"),
        (["scaling", "--job", "training_jobs/dp-mlp.yaml", "--steps", "0"], "--steps '0': give a whole number of at"),
        (["tensorboard", "--port", "http"], "--port 'http': give a whole number from 0 to 65535"),
        # Durations are refused before the run starts, before any cluster is even looked at.
        (
            ["train", "--job", "training_jobs/dp-mlp.yaml", "--down-after", "--grace", "-5m"],
            "--grace '-5m': not a duration; write it like 90s, 5m or 2h",
        ),
        (["train", "--job", "training_jobs/dp-mlp.yaml", "--grace", "5m"], "--grace goes with --down-after"),
        (["demo", "--grace", "5m"], "--grace goes with --down-after"),
        (["demo", "--down-after", "--grace", "soon"], "--grace 'soon': not a duration; write it like 90s, 5m or 2h"),
        (["demo", "--keep", "--down-after"], "--keep leaves the cluster up and --down-after tears its compute down"),
        (["up", "--on-idle", "sleep"], "--on-idle 'sleep': Input should be 'down' or 'park'"),
        (["deadman", "--idle", "ten"], "--idle 'ten': not a duration"),
        (["deadman", "--stall", "5m", "--hard-limit", "1d"], "--hard-limit '1d': not a duration"),
        (["deadman"], "give at least one of --idle, --stall, --hard-limit (or --off)"),
        (["deadman", "--off", "--idle", "5m"], "--off disarms the switch: give it alone"),
        (["park", "--name", "ghost"], "no cluster named 'ghost'"),
        (["cost", "--name", "ghost"], "no cluster named 'ghost'"),
    ],
)
def test_bad_input(tmp_path, args, text):
    assert_one_line_error(fab(*args, home=tmp_path), text)
    assert not (tmp_path / "clusters").exists(), "nothing half-created"


def test_malformed_spec_names_the_field(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text('name: x\nimage: {pull: "a:1"}\ncommand: [a]\nnodes: many\n')
    assert_one_line_error(fab("train", "--job", str(job), home=tmp_path), "nodes: Input should be a valid integer")


def test_no_docker_engine_and_no_way_to_start_one(tmp_path):
    # A PATH with the docker CLI but no dockerd, and a socket nobody listens on.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").symlink_to(shutil.which("docker"))
    env_home = tmp_path / "home"
    result = subprocess.run(
        [str(FAB), "up", "--name", "nodocker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TRAINRIG_HOME": str(env_home),
            "PATH": str(bin_dir),
            "DOCKER_HOST": f"unix://{tmp_path}/absent.sock",
        },
    )
    assert_one_line_error(result, "the Docker engine is not running and trainrig cannot start it")
    assert not (env_home / "clusters").exists()


def test_no_docker_cli(tmp_path):
    result = fab("up", "--name", "nocli", home=tmp_path, path=str(tmp_path))
    assert_one_line_error(result, "the Docker CLI is not installed: install it with `apt-get install -y docker.io`")
