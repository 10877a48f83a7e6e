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
IBM Cloud classic bills a powered-off GPU server in full, so there (config key "softlayer") the
switch cancels the GPU servers through the SoftLayer REST API instead, with a cancel-only
credential kept root-only on this node, and waits until the API lists none of them as billing.
With action "park" (trainrig:on_idle: park) the same power-off parks them instead: AWS instances
are made to stop, and the host watcher leaves the stopped containers for `fab up` to resume.
Stdlib only: it runs with the node's own python3.
"""

import base64
import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]
FINAL_STATES = ("succeeded", "failed", "stalled", "cancelled")
GONE_TIMEOUT = 300  # seconds for every node to stop answering after its power-off
API_TIMEOUT = 30  # seconds for one SoftLayer API call
# A cancelled hourly guest loses its billing item at once, then disappears: either means no more bill.
BILLING_MASK = "mask[id,billingItem[id]]"


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


class ApiError(Exception):
    """A SoftLayer API call that failed: its HTTP status (None: no answer), SoftLayer's fault code and message."""

    def __init__(self, status, code, message):
        super().__init__(f"{message} ({code or status or 'no answer'})")
        self.status = status
        self.code = code

    @property
    def not_found(self):
        return self.status == 404 or "ObjectNotFound" in (self.code or "")

    @property
    def transient(self):
        """Worth asking again before the deadline: no answer, throttled, or IBM's side failed."""
        return self.status is None or self.status == 429 or self.status >= 500


def softlayer(api, credentials, path):
    """GET one SoftLayer REST call (https://api.softlayer.com/rest/v3.1/<Service>/<id>/<method>.json), as JSON.

    HTTP basic auth with the API user's name and API key, as the SoftLayer REST API takes them."""
    token = base64.b64encode(f"{credentials['username']}:{credentials['api_key']}".encode()).decode()
    request = urllib.request.Request(f"{api.rstrip('/')}/{path}", headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=API_TIMEOUT) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        raise ApiError(exc.code, body.get("code", ""), body.get("error") or exc.reason) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ApiError(None, "", f"no answer from {api}: {getattr(exc, 'reason', exc)}") from None


def billing(sl, credentials, guest_id):
    """True while the API still lists the guest with a billing item (an unknown answer counts as billing)."""
    mask = urllib.parse.quote(BILLING_MASK)
    try:
        guest = softlayer(
            sl["api"], credentials, f"SoftLayer_Virtual_Guest/{guest_id}/getObject.json?objectMask={mask}"
        )
    except ApiError as exc:
        return not exc.not_found  # refused or unanswered: not known to be gone, ask again
    return bool((guest or {}).get("billingItem"))


def cancel(cfg, record, record_path):
    """Cancel each GPU server (SoftLayer_Virtual_Guest::deleteObject: an hourly guest ends at once), then wait
    until none bills. Refusals are recorded per host; the exit status says whether all went."""
    sl = cfg["softlayer"]
    servers = sl["servers"]  # host -> guest id
    deadline = time.time() + sl.get("timeout", GONE_TIMEOUT)
    poll = sl.get("poll", 5)
    errors = record["errors"]
    credentials = read_json(cfg["credential"])
    if not credentials or not credentials.get("username") or not credentials.get("api_key"):
        for host in servers:
            errors[host] = f"no cancel credential in {cfg['credential']}: arm the switch again (fab deadman)"
        return sorted(servers)
    pending = dict(servers)
    refused = set()
    while pending:
        for host, guest_id in list(pending.items()):
            try:
                softlayer(sl["api"], credentials, f"SoftLayer_Virtual_Guest/{guest_id}/deleteObject.json")
            except ApiError as exc:
                errors[host] = f"cancelling server {guest_id}: {exc}"
                if exc.not_found:
                    errors.pop(host)  # already gone
                elif not exc.transient:
                    refused.add(host)  # refused (a wrong key, a missing permission): asking again will not help
                else:
                    continue  # asked again below, until the deadline
            else:
                errors.pop(host, None)
                record["cancelled"][host] = guest_id
            del pending[host]
        if not pending or time.time() >= deadline:
            break
        time.sleep(poll)
    record["cancelled_at"] = time.time()
    write_json(record_path, record)
    up = [h for h in servers if h not in pending and h not in refused]
    while True:
        up = [h for h in up if billing(sl, credentials, servers[h])]
        if not up or time.time() >= deadline:
            break
        time.sleep(poll)
    for host in up:
        errors.setdefault(
            host, f"server {servers[host]} still billing {sl.get('timeout', GONE_TIMEOUT)}s after it was cancelled"
        )
    return sorted(set(up) | set(pending) | refused)


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
    if cfg.get("softlayer"):
        record.update(how="cancelled through the SoftLayer API", cancelled={}, errors={})
        print(f"trainrig dead-man switch: {trigger}: {reason}; cancelling {', '.join(hosts)}", flush=True)
        up = cancel(cfg, record, record_path)
        record.update(compute_gone_at=time.time() if not up else None, still_up=up)
        write_json(record_path, record)
        for host, why in record["errors"].items():
            print(f"trainrig dead-man switch: {host}: {why}", file=sys.stderr, flush=True)
        return 0 if not up else 1
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
