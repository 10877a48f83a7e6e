"""Runs one training run on its launch node, detached from the operator: log, metrics, status.

Started by systemd-run, so closing the operator's laptop does not stop the run. Reads run.json
from the run directory, runs its argv, appends every output line to train.log, turns the lines
that match the job's patterns into metrics.jsonl, and keeps status.json current. Stdlib only:
it runs with the node's own python3.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def parse_metrics(line, patterns):
    """{'step': 40, 'loss': 0.81, 'throughput': 123.4} from one log line, or None."""
    found = {}
    for name, pattern in patterns.items():
        match = pattern.search(line)
        if match:
            found[name] = match.group(name)
    if "step" not in found:
        return None
    record = {"step": int(found["step"])}
    for name in ("loss", "throughput"):
        if name in found:
            record[name] = float(found[name])
    return record


def main(run_dir):
    with open(os.path.join(run_dir, "run.json")) as fh:
        run = json.load(fh)
    patterns = {name: re.compile(p) for name, p in run["metrics"].items()}
    status_path = os.path.join(run_dir, "status.json")
    started = time.time()
    status = {"state": "running", "started_at": started, "host": os.uname().nodename}
    write_json(status_path, status)

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
    state = "cancelled" if cancelled else ("succeeded" if code == 0 else "failed")
    status.update(state=state, exit_code=code, ended_at=time.time())
    write_json(status_path, status)
    return 0 if state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
