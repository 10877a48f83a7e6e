"""Runs one training run on its launch node, detached from the operator: log, metrics, status, clean-up.

Started by systemd-run, so closing the operator's laptop does not stop the run. Reads run.json
from the run directory, runs its argv (mpirun inside the run's container, through docker exec),
appends every output line to train.log, turns the lines that match the job's patterns into
metrics.jsonl, and keeps status.json current. It always ends with a final status and a reason,
whatever failed. Afterwards it removes the run's container here and on every other node of the
run (over the cluster's SSH mesh) and the secrets file. Stdlib only: it runs with the node's own
python3.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

SSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"]


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def parse_metrics(line, patterns):
    """{'step': 40, 'loss': 0.81, 'throughput': 123.4} from one log line, or None; garbage is never fatal."""
    found = {}
    for name, pattern in patterns.items():
        match = pattern.search(line)
        if match:
            found[name] = match.group(name)
    try:
        record = {"step": int(found["step"])}
    except (KeyError, ValueError):
        return None
    for name in ("loss", "throughput"):
        try:
            record[name] = float(found[name])
        except (KeyError, ValueError):
            pass
    return record


def remove_containers(run):
    """The run's container here and on its other nodes; the secrets file. Best effort: cancel checks again."""
    name = run.get("container")
    if name:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
        for peer in run.get("peers", []):
            subprocess.run([*SSH, peer, "docker", "rm", "-f", name], capture_output=True, timeout=120)
    if run.get("secrets_file"):
        try:
            os.unlink(run["secrets_file"])
        except FileNotFoundError:
            pass


def supervise(run, run_dir, status, status_path):
    patterns = {name: re.compile(p) for name, p in run["metrics"].items()}
    started = status["started_at"]
    proc = subprocess.Popen(
        run["argv"],
        cwd=run["workdir"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    cancelled = []

    def cancel(signum, _frame):
        cancelled.append(signum)
        # A signal to `docker exec` does not reach the process it started: removing the container
        # ends mpirun, and with it the daemons on the other nodes.
        if run.get("container"):
            subprocess.run(["docker", "rm", "-f", run["container"]], capture_output=True, timeout=120)
        os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    with (
        open(os.path.join(run_dir, "train.log"), "a") as log,
        open(os.path.join(run_dir, "metrics.jsonl"), "a") as metrics,
    ):
        for line in proc.stdout:
            log.write(line)
            log.flush()
            record = parse_metrics(line, patterns)
            if record:
                record["time"] = round(time.time() - started, 3)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
    code = proc.wait()
    if cancelled:
        return "cancelled", code, "cancelled by fab cancel"
    if code == 0:
        return "succeeded", code, None
    return "failed", code, f"mpirun exited with status {code}; see train.log"


def main(run_dir):
    status_path = os.path.join(run_dir, "status.json")
    status = {"state": "running", "started_at": time.time(), "host": os.uname().nodename}
    run = {}
    state, code, reason = "failed", None, None
    try:
        with open(os.path.join(run_dir, "run.json")) as fh:
            run = json.load(fh)
        write_json(status_path, status)
        state, code, reason = supervise(run, run_dir, status, status_path)
    except Exception as exc:
        state, reason = "failed", f"the supervisor on {status['host']} failed: {type(exc).__name__}: {exc}"
    finally:
        remove_containers(run)
        status.update(state=state, exit_code=code, ended_at=time.time(), reason=reason)
        try:
            write_json(status_path, status)
        except OSError as exc:  # a full disk: say it where systemd's journal keeps it
            print(f"trainrig: cannot write {status_path}: {exc}; final state {state}: {reason}", file=sys.stderr)
    return 0 if state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
