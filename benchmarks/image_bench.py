"""The job's image to 1, 4 and 8 local nodes through the storage node's registry and by save|load, side by side,
and the time from `fab train` to the first logged step once the image is in place. A script, not a test.

    .venv/bin/python -m benchmarks.image_bench [--sizes 1,4,8] [--prefix ibench]

For each size N it stands up one local cluster (node0, which builds, plus N receiving GPU-role
nodes, plus the storage node), provisions it, builds the demo job's image on node0 and times
getting it to the N other nodes:
- registry: node0 pushes to the storage node's registry, every other node pulls at once;
- save|load: node0 streams the image to every other node over the SSH mesh, at once.
Each path starts from nodes without the image. Then it launches the demo job with the image in
place and times launch -> first step in metrics.jsonl. Ratios are printed against 1 node.

On one machine every local node shares the same cores and disk, so t(8)/t(1) here measures
the total work; on separate cloud VMs the parallel pulls do not compete for one CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cluster import images, jobs, lifecycle, provision, runs
from infra import inventory, ssh, ui

DEMO = Path(__file__).resolve().parents[1] / "training_jobs" / "dp-mlp.yaml"


def drop_image(inv, nodes, image: str) -> None:
    def drop(node):
        with ssh.open_checked(inv, node) as conn:
            ssh.run(
                conn,
                [
                    "sh",
                    "-c",
                    'docker rmi -f "$1" $(docker images -q --filter reference="*/trainrig/*") 2>/dev/null; true',
                    "drop",
                    image,
                ],
                check=False,
            )

    ssh.on_nodes(nodes, drop)


def timed(work) -> float:
    start = time.monotonic()
    work()
    return time.monotonic() - start


def first_step_after_launch(inv, job) -> float:
    start = time.monotonic()
    record = runs.launch(inv, job)
    node = inv.node(record.node)
    with ssh.open_checked(inv, node) as conn:
        sftp = conn.sftp()
        while not runs.read_from(sftp, f"{record.run_dir}/metrics.jsonl", 0):
            if time.monotonic() - start > 600:
                raise SystemExit("no step within 600 s")
            time.sleep(0.2)
    elapsed = time.monotonic() - start
    runs.cancel(inv, record)
    return elapsed


def case(name: str, size: int) -> dict[str, float]:
    inv = lifecycle.up(name, gpu_nodes=size + 1, data_disk_gb=2)
    try:
        provision.provision(inv)
        job = jobs.load(DEMO)
        nodes = inv.gpu_nodes
        run_id = "bench-0"
        tag = f"trainrig/{job.spec.name}:{run_id}"  # the tag images.ensure builds under
        image = images.ensure(inv, job, nodes[:1], run_id, f"/data/trainrig/{run_id}")
        others = nodes[1:]
        result = {}
        if others:
            target = images.registry(inv)
            with ui.NodeBoard("registry", [n.name for n in nodes]) as board:
                result["registry"] = timed(
                    lambda: images._through_registry(inv, nodes[0], others, tag, image, target, board)
                )
            drop_image(inv, others, image)
            with ui.NodeBoard("save|load", [n.name for n in nodes]) as board:
                result["save|load"] = timed(
                    lambda: ssh.on_nodes(others, lambda n: images._save_load(inv, nodes[0], n, image, board))
                )
        result["train to first step"] = first_step_after_launch(
            inv, job.model_copy(update={"spec": job.spec.model_copy(update={"nodes": 2, "max_steps": 100_000})})
        )
        return result
    finally:
        lifecycle.down(inventory.load(name), purge=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--prefix", default="ibench")
    args = parser.parse_args()
    os.environ.setdefault("TRAINRIG_HOME", tempfile.mkdtemp(prefix="trainrig-bench-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {size: case(f"{args.prefix}{size}", size) for size in sizes}
    base = rows[sizes[0]]
    print(
        f"\n{'to N':>5} {'registry s':>11} {'save|load s':>12} {'reg/save':>9} {'to 1st step s':>14} "
        f"{'t(N)/t(1) reg':>14} {'t(N)/t(1) s|l':>14}"
    )
    for size, r in rows.items():
        ratio = r["registry"] / r["save|load"] if r["save|load"] else float("nan")
        scale_reg = r["registry"] / base["registry"] if base["registry"] else float("nan")
        scale_sl = r["save|load"] / base["save|load"] if base["save|load"] else float("nan")
        print(
            f"{size:>5} {r['registry']:>11.1f} {r['save|load']:>12.1f} {ratio:>9.2f} "
            f"{r['train to first step']:>14.1f} {scale_reg:>14.2f} {scale_sl:>14.2f}"
        )


if __name__ == "__main__":
    main()
