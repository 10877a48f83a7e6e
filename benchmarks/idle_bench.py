"""Idle billable seconds after a run: from its last step to its GPU nodes gone (or parked), for `fab train
--down-after`, for the dead-man switch's idle trigger, and for that trigger with on_idle park. A script, not a test.

    .venv/bin/python -m benchmarks.idle_bench [--name teardown-bench] [--steps 30] [--grace 0] [--idle 10]

On one local cluster (1 GPU-role node + the storage node): provision, train the demo job with
--down-after, and time from the last step's line in metrics.jsonl to the moment Docker no longer
lists the GPU node; then bring the node back, provision it, train again with only the dead-man
switch armed (--idle), and time the same way; then once more with the cluster set to park
(`fab up --on-idle park`), timed to the moment Docker lists the GPU node as stopped. The figures
include the switch's 2 s polling, the node's own power-off and the host watcher's removal (none
when parked); the goal is at most 60 s plus the grace (or the idle time). The cluster is purged
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from cluster import deadman, jobs, lifecycle, provision, runs
from infra import inventory, ssh
from infra.commands import wait_until
from infra.inventory import OnIdle

JOB = Path(__file__).resolve().parents[1] / "training_jobs" / "dp-mlp.yaml"


def gpu_containers(name: str, running: bool = False) -> list[str]:
    """The cluster's GPU node containers: all of them, or those running only."""
    every = [] if running else ["-a"]
    argv = ["docker", "ps", *every, "--filter", f"label=trainrig.cluster={name}", "--filter", "label=trainrig.role=gpu"]
    return subprocess.run([*argv, "-q"], capture_output=True, text=True, check=True).stdout.split()


def last_step_at(inv, record) -> float:
    """When the run logged its last step: its start plus the last metrics line's offset, read on the storage node."""
    storage = inv.storage_node
    assert storage is not None
    with ssh.open_checked(inv, storage) as conn:
        sftp = conn.sftp()
        status = runs.read_status(sftp, record) or {}
        with sftp.open(f"{record.run_dir}/metrics.jsonl") as fh:
            last = json.loads(fh.read().splitlines()[-1])
    return status["started_at"] + last["time"]


def one(name: str, job, arm, on_idle: OnIdle = "down") -> tuple[float, str]:
    inv = lifecycle.up(name, gpu_nodes=1, data_disk_gb=2, on_idle=on_idle)
    provision.provision(inv)
    record = runs.launch(inv, job)
    settings = arm(inv, record)
    deadman.arm(inv, settings)
    running = on_idle == "park"  # a parked node is stopped, not removed
    wait_until(lambda: not gpu_containers(name, running), timeout=1800, interval=0.2, what="the GPU node to go")
    gone = time.time()
    idle = gone - last_step_at(inv, record)
    record_ = deadman.teardown_record(inv) or {}
    return idle, f"{record_.get('trigger')}: {record_.get('reason')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="teardown-bench", help="cluster name (lowercase)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--grace", type=float, default=0.0, help="--down-after grace, seconds")
    parser.add_argument("--idle", type=float, default=10.0, help="dead-man idle time, seconds")
    args = parser.parse_args()
    os.environ.setdefault("TRAINRIG_HOME", tempfile.mkdtemp(prefix="trainrig-bench-"))
    loaded = jobs.load(JOB)
    job = loaded.model_copy(update={"spec": loaded.spec.model_copy(update={"max_steps": args.steps, "nodes": 1})})
    results = []
    try:
        down_after = one(args.name, job, lambda inv, r: deadman.with_run(inv, r.id, r.run_dir, args.grace))
        results.append((f"--down-after (grace {args.grace:.0f}s)", args.grace, *down_after))
        # Only the switch this time: the run ends, and nothing starts within the idle time.
        idle = one(args.name, job, lambda inv, r: deadman.Settings(idle=args.idle))
        results.append((f"dead-man idle ({args.idle:.0f}s)", args.idle, *idle))
        parked = one(args.name, job, lambda inv, r: deadman.Settings(idle=args.idle), on_idle="park")
        results.append((f"dead-man idle, park ({args.idle:.0f}s)", args.idle, *parked))
    finally:
        lifecycle.down(inventory.load(args.name), purge=True)
    print(f"{'path':28} {'idle billable s':>16} {'over the setting':>17}  record")
    for label, setting, seconds, said in results:
        print(f"{label:28} {seconds:16.1f} {seconds - setting:17.1f}  {said}")


if __name__ == "__main__":
    main()
