"""The on-node run supervisor, run for real as a process: log, metrics and status files."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.jobs import MetricPatterns
from cluster.remote import supervisor
from infra.commands import wait_until

SUPERVISOR = Path(supervisor.__file__)


def test_parse_metrics_with_default_patterns():
    patterns = {k: re.compile(v) for k, v in MetricPatterns().model_dump().items()}
    assert supervisor.parse_metrics("step 40/300 loss 0.812 samples/s 1234.5\n", patterns) == {
        "step": 40,
        "loss": 0.812,
        "throughput": 1234.5,
    }
    assert supervisor.parse_metrics("final loss 0.1\n", patterns) is None
    assert supervisor.parse_metrics("step 2 loss nope samples/s 1e999x\n", patterns) == {"step": 2}
    assert supervisor.parse_metrics("step 3 loss nan samples/s 12\n", patterns)["loss"] != 0  # nan: diverged


def run_supervised(tmp_path, script: str, env=None, **run):
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", script],
                "workdir": str(tmp_path),
                "metrics": MetricPatterns().model_dump(),
                **run,
            }
        )
    )
    code = subprocess.run([sys.executable, str(SUPERVISOR), str(tmp_path)], timeout=90, env=env).returncode
    return code, json.loads((tmp_path / "status.json").read_text())


def test_successful_run(tmp_path):
    code, status = run_supervised(tmp_path, "for i in range(1, 4): print(f'step {i} loss {1/i:.3f} samples/s 10')")
    assert code == 0 and status["state"] == "succeeded" and status["exit_code"] == 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["loss"] == pytest.approx(0.333)
    assert "step 3 loss" in (tmp_path / "train.log").read_text()


def test_failed_run_keeps_its_output(tmp_path):
    code, status = run_supervised(tmp_path, "import sys; print('boom'); sys.exit(3)")
    assert code == 1 and status["state"] == "failed" and status["exit_code"] == 3
    assert "boom" in (tmp_path / "train.log").read_text()


def test_a_line_open_mpi_forwarded_in_two_pieces_is_logged_once_untagged(tmp_path):
    script = "print('[1,0]<stdout>:ranks: 0@node0 1@node1[1,0]<stdout>:'); print('[1,1]<stdout>: step 1 loss 1')"
    code, status = run_supervised(tmp_path, script)
    assert code == 0 and (tmp_path / "train.log").read_text() == "ranks: 0@node0 1@node1\nstep 1 loss 1\n"


def test_a_garbage_metrics_line_never_ends_the_run(tmp_path):
    script = "print('step 8: loss estimate 3'); print('step x loss y'); print('step 2 loss nope samples/s 1e999x')"
    code, status = run_supervised(tmp_path, script)
    assert code == 0 and status["state"] == "succeeded"


def test_the_supervisors_own_failure_is_a_final_status_with_a_reason(tmp_path):
    code, status = run_supervised(tmp_path, "print(1)", workdir=str(tmp_path / "missing"))
    assert code == 1 and status["state"] == "failed"
    assert "the supervisor on" in status["reason"] and "FileNotFoundError" in status["reason"]


def test_a_cancel_is_a_cancel_when_the_command_has_already_gone(tmp_path):
    # `systemctl stop` signals every process of the unit at once: the run's command can be gone
    # (and reaped) before the supervisor handles its own SIGTERM. Here the command leaves at once
    # while a process of another session keeps its output open, as the ranks' output would be.
    script = (
        "import os, subprocess, sys; "
        "holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        "print('step 1 loss 1 pid', os.getpid(), 'holder', holder.pid, flush=True)"
    )
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", script],
                "workdir": str(tmp_path),
                "metrics": MetricPatterns().model_dump(),
                "health": {"stall_timeout": 50, "startup_grace": 0},  # the watchdog looks every second
            }
        )
    )
    proc = subprocess.Popen([sys.executable, str(SUPERVISOR), str(tmp_path)])
    log = tmp_path / "train.log"
    pids = wait_until(
        lambda: log.is_file() and re.search(r"pid (\d+) holder (\d+)", log.read_text()),
        timeout=30,
        interval=0.05,
        what="the run's first line",
    )
    try:
        wait_until(
            lambda: not Path(f"/proc/{pids.group(1)}").exists(), timeout=30, interval=0.05, what="the command's end"
        )
        proc.terminate()  # handled at once: the supervisor waits in a read that the signal interrupts
    finally:
        os.kill(int(pids.group(2)), 9)  # the output's last holder: the supervisor reads to its end
    assert proc.wait(timeout=60) == 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["state"], status["reason"]) == ("cancelled", "cancelled by fab cancel")


def test_a_clean_up_command_that_hangs_is_left_not_raised():
    # A stuck engine must not turn a cancel or a run's end into the supervisor's own failure.
    start = time.monotonic()
    assert supervisor.best_effort(["sleep", "30"], timeout=0.2) is None
    assert time.monotonic() - start < 10


def test_the_peers_are_cleaned_at_once_not_in_turn(tmp_path, monkeypatch):
    # A stand-in ssh that finishes only once every peer's command has started: one at a time, the
    # first would give up waiting for the others and leave no mark.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(
        "#!/bin/sh\nfor a; do case $a in node*) peer=$a;; esac; done\n"
        f"touch {tmp_path}/started-$peer\n"
        f"for i in $(seq 50); do [ $(ls {tmp_path} | grep -c started-) -eq 3 ] "
        f"&& touch {tmp_path}/done-$peer && exit 0; sleep 0.1; done; exit 1\n"
    )
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    supervisor.on_each_peer(["node1", "node2", "node3"], ["docker", "rm", "-f", "trainrig-x"], timeout=30)
    assert sorted(p.name for p in tmp_path.glob("done-*")) == ["done-node1", "done-node2", "done-node3"]


def test_a_run_without_new_steps_is_stalled_and_stopped(tmp_path):
    script = "import time; print('step 1 loss 1', flush=True); time.sleep(60)"
    start = time.monotonic()
    code, status = run_supervised(tmp_path, script, health={"stall_timeout": 2, "startup_grace": 0})
    assert status["state"] == "stalled" and code == 1
    assert status["reason"].startswith("no new step for 2s (last: step 1 at ")
    assert time.monotonic() - start < 30 and status["heartbeat_at"] >= status["started_at"]


def test_a_node_that_stops_answering_fails_the_run_naming_it(tmp_path):
    # A stand-in ssh: node1 answers, node2 never does (a frozen or killed host).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(
        '#!/bin/sh\nfor a; do host=$a; [ "$a" = true ] && break; prev=$a; done\n'
        '[ "$prev" = node2 ] && sleep 30; exit 0\n'
    )
    (bin_dir / "ssh").chmod(0o755)
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = "import time\nfor i in range(1, 300): print(f'step {i} loss 1', flush=True); time.sleep(0.2)"
    start = time.monotonic()
    code, status = run_supervised(
        tmp_path,
        script,
        env=env,
        peers=["node1", "node2"],
        container="trainrig-x",
        health={"node_check_every": 2, "stall_timeout": 60, "startup_grace": 0},
    )
    assert status["state"] == "failed" and re.fullmatch(r"node2 unreachable since \d\d:\d\d:\d\d", status["reason"])
    assert time.monotonic() - start < 40


def test_a_failing_rank_is_named_with_its_host_and_last_lines(tmp_path):
    # What Open MPI 4 prints with --tag-output when rank 3 exits with code 4.
    script = (
        "import sys\n"
        "print('[1,0]<stdout>:step 1 loss 1')\n"
        "print('[1,3]<stdout>:loading shard 3')\n"
        "print('[1,3]<stderr>:RuntimeError: CUDA out of memory')\n"
        "print('mpirun detected that one or more processes exited with non-zero status, thus causing')\n"
        "print('the job to be terminated. The first process to do so was:')\n"
        "print('  Process name: [[41235,1],3]')\n"
        "print('  Exit code:    4')\n"
        "sys.exit(4)\n"
    )
    code, status = run_supervised(tmp_path, script, hosts=["node0", "node1"], slots=2)
    assert status["state"] == "failed" and status["exit_code"] == 4
    assert status["reason"] == (
        "rank 3 on node1 exited with code 4; its last lines: loading shard 3 | RuntimeError: CUDA out of memory"
    )
    log = (tmp_path / "train.log").read_text()
    assert "step 1 loss 1" in log and "<stdout>" not in log  # the log stays readable, the rank tags go


def test_a_node_that_died_is_named_from_open_mpis_report(tmp_path):
    script = (
        "import sys\n"
        "print('[1,0]<stdout>:step 4 loss 1')\n"
        "print('ORTE has lost communication with a remote daemon.')\n"
        "print('  HNP daemon   : [[5130,0],0] on node node0')\n"
        "print('  Remote daemon: [[5130,0],1] on node node1')\n"
        "sys.exit(1)\n"
    )
    code, status = run_supervised(tmp_path, script, hosts=["node0", "node1"], slots=2)
    assert status["state"] == "failed"
    assert status["reason"] == "node1 lost: its MPI daemon stopped answering (the node died or its network went)"


def test_the_jobs_own_metrics_are_recorded_at_their_step(tmp_path):
    patterns = {**MetricPatterns().model_dump(), "bleu": r"BLEU = (?P<bleu>\S+)", "top1": r"top-1 (?P<top1>\S+)"}
    script = (
        "print('BLEU = 1.0')\n"  # before any step: nothing to pin it to
        "print('step 10 loss 2.0 top-1 0.25')\n"
        "print('eval: BLEU = 27.5')\n"
        "print('eval: BLEU = n/a')\n"  # garbage: no record, the run goes on
        "print('step 20 loss 1.0')\n"
    )
    (tmp_path / "run.json").write_text(
        json.dumps({"argv": [sys.executable, "-c", script], "workdir": str(tmp_path), "metrics": patterns})
    )
    assert subprocess.run([sys.executable, str(SUPERVISOR), str(tmp_path)], timeout=90).returncode == 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k != "time"} for m in metrics] == [
        {"step": 10, "loss": 2.0, "top1": 0.25},
        {"step": 10, "bleu": 27.5},
        {"step": 20, "loss": 1.0},
    ]


def test_a_node_that_died_before_two_checks_is_named_when_mpirun_ends_first(tmp_path):
    # mpirun ends at once, its box naming no host, long before a check of the nodes is due; node2 is gone.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(
        '#!/bin/sh\nfor a; do [ "$a" = true ] && break; prev=$a; done\n[ "$prev" = node2 ] && exit 255; exit 0\n'
    )
    (bin_dir / "ssh").chmod(0o755)
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = (
        "import sys\n"
        "print('[1,0]<stdout>:step 4 loss 1')\n"
        "print('-' * 74)\n"
        "print('A daemon (pid 4242) died unexpectedly with status 255 while attempting')\n"
        "print('to launch so we are aborting.')\n"
        "print('-' * 74)\n"
        "sys.exit(255)\n"
    )
    code, status = run_supervised(
        tmp_path,
        script,
        env=env,
        peers=["node1", "node2"],
        container="trainrig-x",
        health={"node_check_every": 60, "stall_timeout": 600, "startup_grace": 0},
    )
    assert status["state"] == "failed" and re.fullmatch(r"node2 unreachable since \d\d:\d\d:\d\d", status["reason"])


def test_mpiruns_own_words_are_the_cause_when_every_node_answers(tmp_path):
    script = "import sys\nprint('an error in mpirun itself')\nprint('-' * 74)\nsys.exit(1)\n"
    code, status = run_supervised(tmp_path, script)
    assert status["reason"] == "mpirun exited with status 1: an error in mpirun itself"  # not the box's rule
