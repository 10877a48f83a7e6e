"""Provisioning wall time on 1, 4 and 8 local nodes with trainrig's settings, and on 8 with
Ansible's defaults, side by side; plus the second (no-change) run. A script, not a test.

    .venv/bin/python -m benchmarks.provision_bench [--sizes 1,4,8] [--prefix bench]

Each case stands up its own local cluster (N GPU-role nodes + the storage node), runs
site.yml twice and removes the cluster. Host keys stay pinned in every case.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from cluster import lifecycle, provision
from infra import inventory


# Ansible's own defaults where ours differ: 5 forks, no pipelining, facts gathered by every play,
# ssh_args "-C -o ControlMaster=auto -o ControlPersist=60s" (plus our pinned known_hosts file).
def ansible_defaults(inv) -> dict[str, str]:
    pinned = provision.ansible_env(inv)["ANSIBLE_SSH_ARGS"].split("-o ControlPersist=120s")[1]
    return {
        "ANSIBLE_FORKS": "5",
        "ANSIBLE_PIPELINING": "False",
        "ANSIBLE_GATHERING": "implicit",
        "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=60s" + pinned,
    }


def timed(inv, settings):
    start = time.monotonic()
    recap = provision.provision(inv, settings=settings)
    return time.monotonic() - start, recap


def case(name: str, nodes: int, defaults: bool) -> tuple[float, float, int]:
    inv = lifecycle.up(name, gpu_nodes=nodes, data_disk_gb=1)
    try:
        settings = ansible_defaults(inv) if defaults else None
        first, _ = timed(inv, settings)
        second, recap = timed(inv, settings)
        return first, second, sum(r.changed for r in recap.hosts.values())
    finally:
        lifecycle.down(inventory.load(name), purge=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8", help="GPU-role node counts with our settings")
    parser.add_argument("--prefix", default="bench", help="cluster name prefix (lowercase)")
    args = parser.parse_args()
    os.environ.setdefault("TRAINRIG_HOME", tempfile.mkdtemp(prefix="trainrig-bench-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = [(n, False) for n in sizes] + [(max(sizes), True)]
    rows = []
    for n, defaults in cases:
        label = "ansible defaults" if defaults else "trainrig settings"
        first, second, changed = case(f"{args.prefix}{n}{'d' if defaults else ''}", n, defaults)
        rows.append((n, label, first, second, changed))
        print(f"{n} gpu nodes, {label}: first {first:.1f}s, second {second:.1f}s, changed {changed}", flush=True)
    print(f"\n{'gpu nodes':>9}  {'hosts':>5}  {'settings':<18} {'first run':>10} {'second run':>11} {'changed':>8}")
    for n, label, first, second, changed in rows:
        print(f"{n:>9}  {n + 1:>5}  {label:<18} {first:>9.1f}s {second:>10.1f}s {changed:>8}")


if __name__ == "__main__":
    main()
