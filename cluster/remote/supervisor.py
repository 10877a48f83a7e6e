"""Runs one training run on its launch node, detached from the operator: log, metrics, status, clean-up.

Started by systemd-run, so closing the operator's laptop does not stop the run. Reads run.json
from the run directory, runs its argv (mpirun inside the run's container, through docker exec),
appends every output line to train.log, turns the lines that match the job's patterns into
metrics.jsonl, and keeps status.json current. It always ends with a final status and a reason,
whatever failed. Afterwards it removes the run's container here and on every other node of the
run (over the cluster's SSH mesh) and the secrets file. Stdlib only: it runs with the node's own
python3.
"""

import collections
import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

SSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]
# Open MPI's --tag-output: "[job,rank]<stdout>:text" (4) or "[job,rank]<stdout>: text" (5).
TAG = re.compile(r"^\[\d+,(\d+)\]<(?:stdout|stderr)>: ?")
# A tag again at a line's end: Open MPI tags each piece it forwards, so a line that reached it in two
# writes (its text, then the newline) comes out as "<tag>text<tag>".
TAG_INSIDE = re.compile(r"\[\d+,\d+\]<(?:stdout|stderr)>: ?(?=\n?$)")
# What mpirun says about the first rank that failed.
FIRST_FAILED = re.compile(r"Process name:\s*\[\[?\d+,\d+\]?,?(\d+)\]")
EXIT_CODE = re.compile(r"Exit code:\s*(-?\d+)")
# What mpirun says when a node's daemon dies with it (a killed or rebooted host).
LOST_DAEMON = re.compile(r"Remote daemon:.*? on node (\S+)")
CORE_METRICS = ("step", "loss", "throughput")  # every job has these patterns; any others are the job's own
HEARTBEAT_EVERY = 5
NODE_TIMEOUT = 8  # seconds for one check of a node: a frozen host accepts TCP but never answers


def stamp(when):
    return time.strftime("%H:%M:%S", time.localtime(when))


class Watch:
    """What the supervisor knows while mpirun runs, and the first verdict that ends the run."""

    def __init__(self, run, started):
        health = run.get("health") or {}
        self.stall_timeout = health.get("stall_timeout", 900)
        self.grace = health.get("startup_grace", 900)
        self.check_every = health.get("node_check_every", 10)
        self.started = started
        self.last_step, self.last_step_at = None, started
        self.tails = collections.defaultdict(lambda: collections.deque(maxlen=5))
        self.verdict = None  # (state, reason) once decided
        self.lost = {}  # peer -> when it first failed to answer a check
        self.lock = threading.Lock()

    def decide(self, state, reason):
        with self.lock:
            if self.verdict is None:
                self.verdict = (state, reason)
                return True
        return False

    def stalled(self, now):
        """A reason when no new step came for too long (first step: after the start-up grace)."""
        if self.last_step is None:
            if now - self.started > self.grace + self.stall_timeout:
                return f"no step logged {self.grace + self.stall_timeout:.0f}s after the start"
            return None
        if now - self.last_step_at > self.stall_timeout:
            return (
                f"no new step for {self.stall_timeout:.0f}s (last: step {self.last_step} at {stamp(self.last_step_at)})"
            )
        return None


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def parse_metrics(line, patterns):
    """{'step': 40, 'loss': 0.81, 'throughput': 123.4, ...the job's own} from one log line, or None.

    A value that is not a number is left out of the record; garbage is never fatal.
    """
    found = {}
    for name, pattern in patterns.items():
        match = pattern.search(line)
        if match:
            found[name] = match.group(name)
    record = {}
    for name, text in found.items():
        try:
            value = int(text) if name == "step" else float(text)
        except ValueError:
            continue
        # A loss may diverge to nan or inf and says so; an infinite rate or score is only a number misread.
        if name in ("step", "loss") or math.isfinite(value):
            record[name] = value
    if "step" in record:
        return record
    # Without a step only the job's own metrics count (an evaluation's BLEU, say): they belong to the last step.
    own = {k: v for k, v in record.items() if k not in CORE_METRICS}
    return own or None


def best_effort(argv, timeout):
    """Run a clean-up command; one that hangs (a stuck engine, a peer gone quiet) is left, not raised."""
    try:
        subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def on_each_peer(peers, argv, timeout):
    """Run argv on every peer at once over SSH, best effort: a quiet peer costs its timeout once, not in turn."""
    if peers:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(peers), 32)) as pool:
            list(pool.map(lambda peer: best_effort([*SSH, peer, *argv], timeout), peers))


def remove_containers(run):
    """The run's container here and on its other nodes; the secrets file. Best effort: cancel checks again."""
    name = run.get("container")
    if name:
        best_effort(["docker", "rm", "-f", name], timeout=120)
        on_each_peer(run.get("peers", []), ["docker", "rm", "-f", name], timeout=120)
    if run.get("secrets_file"):
        try:
            os.unlink(run["secrets_file"])
        except FileNotFoundError:
            pass


def reachable(peer):
    try:
        return subprocess.run([*SSH, peer, "true"], capture_output=True, timeout=NODE_TIMEOUT).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def stop_local_ranks(run, proc):
    """End the run's container here and the process group of its command (the docker exec client)."""
    # A signal to `docker exec` does not reach the process it started: removing the container
    # ends mpirun, and with it the daemons on the other nodes.
    if run.get("container"):
        best_effort(["docker", "rm", "-f", run["container"]], timeout=120)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # already gone: `systemctl stop` signals the unit's every process at once
        pass


def stop_ranks(run, proc, skip=()):
    """End the run's ranks everywhere a node answers: removing a container ends what runs in it."""
    name = run.get("container")
    stop_local_ranks(run, proc)
    if name:
        on_each_peer([p for p in run.get("peers", []) if p not in skip], ["docker", "rm", "-f", name], timeout=30)


def watchdog(run, watch, status, status_path, proc):
    """Heartbeat, stall and node loss, decided here on the cluster, whatever the operator's laptop does."""
    lost = watch.lost
    next_check = time.time() + watch.check_every
    while proc.poll() is None and watch.verdict is None:
        now = time.time()
        status["heartbeat_at"] = now
        write_json(status_path, status)
        reason = watch.stalled(now)
        if reason and watch.decide("stalled", reason):
            stop_ranks(run, proc)
            return
        if now >= next_check:
            next_check = now + watch.check_every
            for peer in run.get("peers", []):
                if reachable(peer):
                    lost.pop(peer, None)
                else:
                    lost.setdefault(peer, now)
            # Two checks in a row: one slow answer is not a lost node.
            gone = [p for p, since in lost.items() if time.time() - since >= watch.check_every]
            if gone and watch.decide("failed", f"{gone[0]} unreachable since {stamp(lost[gone[0]])}"):
                stop_ranks(run, proc, skip=gone)
                return
        time.sleep(min(HEARTBEAT_EVERY, watch.check_every, 1.0 if watch.stall_timeout < 60 else HEARTBEAT_EVERY))


def failure_cause(run, code, mpirun_tail, watch):
    """The first failing rank, its host, exit code and last lines, from what mpirun reported."""
    text = "\n".join(mpirun_tail)
    lost = LOST_DAEMON.search(text)
    if lost:
        return f"{lost.group(1)} lost: its MPI daemon stopped answering (the node died or its network went)"
    rank = FIRST_FAILED.search(text)
    exit_code = EXIT_CODE.search(text)
    if not rank:
        said = [line for line in mpirun_tail if any(c.isalnum() for c in line)]  # not the box's rules
        return f"mpirun exited with status {code}: {said[-1] if said else 'no output'}"
    r = int(rank.group(1))
    hosts, slots = run.get("hosts") or [], run.get("slots") or 1
    host = hosts[r // slots] if r // slots < len(hosts) else "?"
    said = " | ".join(watch.tails.get(r, [])) or "no output"
    code_text = exit_code.group(1) if exit_code else str(code)
    return f"rank {r} on {host} exited with code {code_text}; its last lines: {said}"


def supervise(run, run_dir, status, status_path):
    patterns = {name: re.compile(p) for name, p in run["metrics"].items()}
    started = status["started_at"]
    watch = Watch(run, started)
    status["stall_timeout"] = watch.stall_timeout  # fab monitor warns before it fires
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
        stop_local_ranks(run, proc)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    threading.Thread(target=watchdog, args=(run, watch, status, status_path, proc), daemon=True).start()
    untagged = collections.deque(maxlen=40)  # mpirun's own lines: where it reports the failing rank
    with (
        open(os.path.join(run_dir, "train.log"), "a") as log,
        open(os.path.join(run_dir, "metrics.jsonl"), "a") as metrics,
    ):
        for raw in proc.stdout:
            tag = TAG.match(raw)
            line = TAG_INSIDE.sub("", raw[tag.end() :]) if tag else raw
            if tag:
                watch.tails[int(tag.group(1))].append(line.rstrip()[:200])
            elif line.strip():
                untagged.append(line.rstrip())
            log.write(line)
            log.flush()
            record = parse_metrics(line, patterns)
            if record and "step" not in record:
                record = {"step": watch.last_step, **record} if watch.last_step is not None else None
            elif record and record["step"] != watch.last_step:
                watch.last_step, watch.last_step_at = record["step"], time.time()
            if record:
                record["time"] = round(time.time() - started, 3)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
    code = proc.wait()
    if cancelled:
        return "cancelled", code, "cancelled by fab cancel"
    if watch.verdict:
        return watch.verdict[0], code, watch.verdict[1]
    if code == 0:
        return "succeeded", code, None
    # mpirun often ends before two checks have missed a node that died with its ranks, and what it
    # says then need not name the host: a node that does not answer now is the cause.
    gone = unreachable_now(run.get("peers", []))
    if gone:
        return "failed", code, f"{gone[0]} unreachable since {stamp(watch.lost.get(gone[0], time.time()))}"
    return "failed", code, failure_cause(run, code, list(untagged), watch)


def unreachable_now(peers):
    """The peers that do not answer one check, each checked at once (a frozen one takes NODE_TIMEOUT)."""
    if not peers:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(peers), 32)) as pool:
        answers = list(pool.map(reachable, peers))
    return [peer for peer, answered in zip(peers, answers, strict=True) if not answered]


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
