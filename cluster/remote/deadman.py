"""The cluster's dead-man switch: stops the compute when a run is over or forgotten, with the laptop gone.

Started by systemd-run on the storage node (or, with EFS, on the first GPU node), it reads its
config from the shared storage and watches the runs there. It fires on the first of:
- after_run: the run it was armed for reached a final state, and the grace period passed;
- idle: no run is going, and none started within the idle time after the last one ended;
- stall: a running run has logged no new step for the stall time;
- hard_limit: that long has passed since the cluster's compute came up.
Then it writes teardown.json on the shared storage (who, when, why), asks every GPU node to
power off over the cluster's SSH mesh, and waits until none answers. Each cloud turns a node's
own power-off into the end of its billing: AWS instances are made with instance-initiated
shutdown = terminate, and the local cloud's host watcher removes a node container that stopped.
With action "park" (trainrig:on_idle: park) the same power-off parks them instead: AWS instances
are made to stop, and the host watcher leaves the stopped containers for `fab up` to resume.
Stdlib only: it runs with the node's own python3.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

SSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]
FINAL_STATES = ("succeeded", "failed", "stalled", "cancelled")
GONE_TIMEOUT = 300  # seconds for every node to stop answering after its power-off


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


def span(seconds):
    seconds = int(seconds)
    if seconds % 3600 == 0 and seconds:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def stamp(when):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def runs(shared):
    """Every run on the shared storage: (run_dir, status or None)."""
    found = []
    for path in glob.glob(os.path.join(shared, "trainrig", "runs", "*", "status.json")):
        found.append((os.path.dirname(path), read_json(path)))
    return found


def last_progress(run_dir, status):
    """When the run last logged a step (metrics.jsonl is appended to at every step), else when it started."""
    try:
        return os.stat(os.path.join(run_dir, "metrics.jsonl")).st_mtime
    except FileNotFoundError:
        return (status or {}).get("started_at") or os.stat(os.path.join(run_dir, "status.json")).st_mtime


def verdict(cfg, now):
    """(trigger, reason) when the switch should fire now, else None."""
    after = cfg.get("after_run")
    if after:
        status = read_json(os.path.join(after["run_dir"], "status.json")) or {}
        if status.get("state") in FINAL_STATES:
            ended = status.get("ended_at") or now
            if now - ended >= after.get("grace", 0):
                return "down-after", f"run {after['id']} {status['state']} at {stamp(ended)}"
    if cfg.get("hard_limit") is not None and now - cfg["up_since"] >= cfg["hard_limit"]:
        return (
            "hard-limit",
            f"the compute has been up since {stamp(cfg['up_since'])}, the limit is {span(cfg['hard_limit'])}",
        )
    known = runs(cfg["shared"])
    going = [(d, s) for d, s in known if (s or {}).get("state") not in FINAL_STATES]
    if cfg.get("stall") is not None:
        for run_dir, status in going:
            since = last_progress(run_dir, status)
            if now - since >= cfg["stall"]:
                name = os.path.basename(run_dir)
                return "stall", f"run {name} logged no new step for {span(cfg['stall'])} (since {stamp(since)})"
    if cfg.get("idle") is not None and not going:
        ended = [s.get("ended_at") or 0 for _, s in known if s]
        quiet_since = max([cfg["armed_at"], *ended])
        if now - quiet_since >= cfg["idle"]:
            return "idle", f"no run going since {stamp(quiet_since)}, the idle time is {span(cfg['idle'])}"
    return None


def answers(host):
    try:
        return subprocess.run([*SSH, host, "true"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def power_off(host):
    # The connection drops as the node goes down: its exit status says nothing, the wait below does.
    try:
        subprocess.run([*SSH, host, "shutdown", "-h", "now"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        pass


def teardown(cfg, record_path, trigger, reason):
    me = socket.gethostname()
    hosts = cfg["hosts"]
    record = {
        "by": f"the dead-man switch on {me}",
        "trigger": trigger,
        "reason": reason,
        "at": time.time(),
        "hosts": hosts,
        "action": cfg.get("action", "down"),  # park: the cloud keeps the stopped nodes and their disks
        "compute_gone_at": None,
        "still_up": [],
    }
    write_json(record_path, record)
    print(f"trainrig dead-man switch: {trigger}: {reason}; powering off {', '.join(hosts)}", flush=True)
    others = [h for h in hosts if h != me]
    for host in others:
        power_off(host)
    deadline = time.time() + GONE_TIMEOUT
    up = list(others)
    while up and time.time() < deadline:
        up = [h for h in up if answers(h)]
        if up:
            time.sleep(1)
    record.update(compute_gone_at=time.time() if not up else None, still_up=up)
    write_json(record_path, record)
    if me in hosts:  # EFS: the switch lives on a GPU node, which goes last
        subprocess.run(["shutdown", "-h", "now"], check=False)
    return 0 if not up else 1


def main(config_path):
    cfg = read_json(config_path)
    if cfg is None:
        print(f"trainrig dead-man switch: no config at {config_path}", file=sys.stderr)
        return 2
    record_path = os.path.join(cfg["shared"], "trainrig", "teardown.json")
    state_path = os.path.join(os.path.dirname(config_path), "state.json")
    while True:
        now = time.time()
        found = verdict(cfg, now)
        write_json(state_path, {"heartbeat_at": now, "fired": bool(found)})
        if found:
            return teardown(cfg, record_path, *found)
        time.sleep(cfg.get("every", 2.0))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
