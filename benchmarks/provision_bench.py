"""Provisioning time at several cluster sizes, trainrig's settings (Mitogen's linear strategy)
against Ansible's defaults and against trainrig's settings on Ansible's own linear strategy,
measured side by side in one run. A script, not a test.

    .venv/bin/python -m benchmarks.provision_bench [--sizes 1,4,8,16] [--compare-at 8] [--prefix bench]

Each case stands up its own local cluster (N GPU-role nodes + the storage node) and provisions
it three times:
  first     site.yml on fresh nodes;
  no-change a second `fab provision`: trainrig reads each node's phase records and runs nothing
            that has not changed (the other two are run without records: every task runs);
  forced    every task again (`--force`): what a no-change run costs without the records;
  baked     (trainrig only) a new cluster of the same size whose GPU nodes start from this
            one's node0, baked with `fab bake`: its first provisioning.
For each run it prints the wall time, the controller's CPU seconds (this process and
ansible-playbook's) and the nodes' CPU seconds (each node container's cgroup), then removes the
cluster. Host keys stay pinned in every case.

Local nodes share this machine's cores, so wall time across N local nodes measures the total
work, not what N separate machines would see. The projection to N separate machines is
    controller CPU / controller cores  +  the busiest node's CPU
(nodes work in parallel on their own machines; the controller's work is shared by its forks
over --controller-cores cores). It ignores network latency, so it is a lower bound that grows
the way the real time grows with N.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster import bake, lifecycle, provision
from infra import inventory
from infra.clouds.local.instance import container_name
from infra.errors import TrainrigError


# Ansible's own defaults where ours differ: its linear strategy, 5 forks, no pipelining, facts
# gathered by every play, ssh_args "-C -o ControlMaster=auto -o ControlPersist=60s" (plus our
# pinned known_hosts file), no fact cache.
def ansible_defaults(inv) -> dict[str, str]:
    pinned = provision.ansible_env(inv)["ANSIBLE_SSH_ARGS"].split("-o ControlPersist=120s")[1]
    return {
        "ANSIBLE_STRATEGY": "linear",
        "ANSIBLE_FORKS": "5",
        "ANSIBLE_PIPELINING": "False",
        "ANSIBLE_GATHERING": "implicit",
        "ANSIBLE_CACHE_PLUGIN": "memory",
        "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=60s" + pinned,
    }


# trainrig's settings before Mitogen became the default: the same, on Ansible's linear strategy
# (what TRAINRIG_ANSIBLE_STRATEGY=linear gives).
def linear() -> dict[str, str]:
    return provision.strategy_env("linear")


@dataclass
class Measure:
    wall: float
    controller_cpu: float
    node_cpu: dict[str, float]
    changed: int
    # The most tasks one node ran or skipped: the controller pays for each (a forked worker).
    tasks: int

    def total_cpu(self) -> float:
        return self.controller_cpu + sum(self.node_cpu.values())

    def projected(self, controller_cores: int) -> float:
        return self.controller_cpu / controller_cores + max(self.node_cpu.values())


def cpu_of_nodes(inv) -> dict[str, float]:
    """CPU seconds each node container has used so far, from its cgroup (v1 cpuacct or v2 cpu.stat)."""
    used = {}
    for node in inv.nodes:
        full = subprocess.run(
            ["docker", "inspect", "-f", "{{.Id}}", container_name(inv.cluster, node.name)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{full}/cpuacct.usage")
        if v1.exists():
            used[node.name] = int(v1.read_text()) / 1e9
            continue
        (v2,) = Path("/sys/fs/cgroup").glob(f"**/*{full}*/cpu.stat")
        usage = dict(line.split() for line in v2.read_text().splitlines())
        used[node.name] = int(usage["usage_usec"]) / 1e6
    return used


def controller_cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measured(inv, settings, force) -> Measure:
    nodes_before, controller_before, start = cpu_of_nodes(inv), controller_cpu(), time.monotonic()
    recap = provision.provision(inv, settings=settings, force=force)
    wall, controller = time.monotonic() - start, controller_cpu() - controller_before
    nodes = {name: used - nodes_before[name] for name, used in cpu_of_nodes(inv).items()}
    tasks = max((r.ok + r.skipped + r.failed for r in recap.hosts.values()), default=0)
    return Measure(wall, controller, nodes, sum(r.changed for r in recap.hosts.values()), tasks)


def case(name: str, nodes: int, kind: str | None, label: str, runs: dict[str, Measure]) -> None:
    """Measure one size and setting into `runs`, which keeps what was measured if a later run fails."""
    inv = lifecycle.up(name, gpu_nodes=nodes, data_disk_gb=1)

    def run(what: str, measure: Callable[[], Measure]) -> None:
        runs[what] = m = measure()
        # Printed as each run ends: a later failure of this size keeps what was measured.
        print(
            f"{nodes:>2} nodes, {label}, {what}: {m.wall:.1f}s wall, controller {m.controller_cpu:.1f} CPU-s, "
            f"nodes {sum(m.node_cpu.values()):.1f} CPU-s (busiest {max(m.node_cpu.values()):.1f}), "
            f"changed {m.changed}, at most {m.tasks} tasks on a node",
            flush=True,
        )

    try:
        settings = ansible_defaults(inv) if kind == "defaults" else linear() if kind == "linear" else None
        run("first", lambda: measured(inv, settings, force=True))
        # Only trainrig keeps phase records; the others run every task every time.
        run("no-change", lambda: measured(inv, settings, force=kind is not None))
        run("forced", lambda: measured(inv, settings, force=True))
        if kind is None:
            run("baked", lambda: on_a_baked_image(inv, nodes))
    finally:
        lifecycle.down(inventory.load(name), purge=True)


def on_a_baked_image(inv, nodes: int) -> Measure:
    """Provisioning a new cluster whose GPU nodes start from this one's node0 and whose storage node
    from this one's, both baked (fab bake)."""
    baked = bake.bake(inv, "node0", f"{inv.cluster}-bench")
    twin = f"{inv.cluster}-b"
    try:
        fresh = lifecycle.up(
            twin, gpu_nodes=nodes, data_disk_gb=1, image=baked.image, storage_image=baked.storage_image
        )
        return measured(fresh, None, force=False)
    finally:
        if inventory.path_for(twin).is_file():
            lifecycle.down(inventory.load(twin), purge=True)
        images = [i for i in (baked.image, baked.storage_image) if i]
        subprocess.run(["docker", "image", "rm", *images], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1,4,8,16", help="GPU-role node counts with trainrig's settings ('' for none)"
    )
    parser.add_argument("--compare-at", type=int, default=8, help="the size at which the other settings run (0: none)")
    parser.add_argument("--controller-cores", type=int, default=4, help="cores of the operator's machine")
    parser.add_argument("--prefix", default="bench", help="cluster name prefix (lowercase)")
    args = parser.parse_args()
    os.environ.setdefault("TRAINRIG_HOME", tempfile.mkdtemp(prefix="trainrig-bench-"))
    cases = [(int(n), "trainrig", None) for n in args.sizes.split(",") if n.strip()]
    if args.compare_at:
        cases.append((args.compare_at, "ansible defaults", "defaults"))
        cases.append((args.compare_at, "trainrig, linear", "linear"))
    results: dict[tuple[int, str], dict[str, Measure]] = {}
    for n, label, kind in cases:
        try:
            case(f"{args.prefix}{n}{kind[0] if kind else ''}", n, kind, label, results.setdefault((n, label), {}))
        except TrainrigError as exc:  # one size failing leaves the others' figures standing
            print(f"{n:>2} nodes, {label}: failed: {exc}", flush=True)
    report(results, args.controller_cores, args.compare_at)


def report(results: dict[tuple[int, str], dict[str, Measure]], cores: int, compare_at: int) -> None:
    print(
        f"\n{'nodes':>5} {'settings':<17} {'run':<10} {'wall s':>7} {'ctl CPU s':>9} "
        f"{'node CPU s':>10} {'max node':>8} {'projected s':>11} {'changed':>7} {'tasks/node':>10}"
    )
    for (n, label), runs in results.items():
        for run, m in runs.items():
            print(
                f"{n:>5} {label:<17} {run:<10} {m.wall:>7.1f} {m.controller_cpu:>9.1f} "
                f"{sum(m.node_cpu.values()):>10.1f} {max(m.node_cpu.values()):>8.1f} "
                f"{m.projected(cores):>11.1f} {m.changed:>7} {m.tasks:>10}"
            )
    ours = {n: runs for (n, label), runs in results.items() if label == "trainrig" and "first" in runs}
    print()
    for n, runs in ours.items():
        if "no-change" in runs:
            print(f"{n} nodes: no-change / first = {runs['no-change'].wall / runs['first'].wall:.1%} (goal <= 10%)")
        if "baked" in runs:
            ratio = runs["baked"].wall / runs["no-change"].wall
            print(
                f"{n} nodes: on a baked image / no-change = {ratio:.2f} (goal <= 1.2; the first run is ready to train)"
            )
            # A new cluster has no records to skip by: its peer is the run where every task runs and nothing changes.
            forced = runs["baked"].wall / runs["forced"].wall
            print(f"{n} nodes: on a baked image / every task forced = {forced:.2f}")
    if len(ours) > 1:
        small, large = min(ours), max(ours)
        ratio = ours[large]["first"].projected(cores) / ours[small]["first"].projected(cores)
        print(f"projected t({large})/t({small}), first run = {ratio:.2f} (goal <= 1.3)")
        first_small, first_large = ours[small]["first"], ours[large]["first"]
        per_node = (first_large.controller_cpu - first_small.controller_cpu) / (large - small)
        print(
            f"controller CPU per extra node, first run = {per_node:.2f} s "
            f"({per_node / max(first_large.tasks, 1) * 1000:.0f} ms per task, {first_large.tasks} tasks on a node)"
        )
    for label in ("ansible defaults", "trainrig, linear"):
        other = results.get((compare_at, label))
        if other and compare_at in ours:
            for run in ("first", "no-change"):
                if run not in other or run not in ours[compare_at]:
                    continue
                theirs, mine = other[run], ours[compare_at][run]
                cpu = theirs.total_cpu() / mine.total_cpu()
                print(
                    f"{compare_at} nodes, {run}: {label} / trainrig = {theirs.wall / mine.wall:.2f}x wall, "
                    f"{cpu:.2f}x CPU (goal >= 3x on the first run)"
                )


if __name__ == "__main__":
    main()
