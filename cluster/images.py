"""The job's image on every node of a run, pinned to one image id, with live progress per node.

Three ways, as a run needs:
- pull: every node pulls the reference at once (registry_login has logged them in);
- build: once, on the first node (so a CUDA build sees the GPU runtime), then pushed to the
  private registry on the storage node, from which the other nodes pull at once; layers a node
  already has are not sent again;
- save | load: with no storage node (EFS), the first node streams the image to each other node
  over the cluster's own SSH mesh, skipping nodes that already hold it.
A cloud whose nodes reach no public registry (the local one) offers stand-ins for the base
images a Dockerfile names; they are streamed from the operator's machine to the build node.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from cluster import jobs, transfer
from infra import clouds, ssh, ui
from infra.errors import TrainrigError
from infra.inventory import Inventory, Node

REGISTRY_PORT = 5000
BUILD_TIMEOUT = 3600
TRANSFER_TIMEOUT = 3600


def registry(inv: Inventory) -> str | None:
    """host:port of the cluster's private registry, as the nodes name it (the storage node), or none (EFS)."""
    node = inv.storage_node
    return f"{node.name}:{REGISTRY_PORT}" if node else None


def ensure(inv: Inventory, job: jobs.LoadedJob, nodes: list[Node], run_id: str, run_dir: str) -> str:
    """Put the job's image on every node; return the id every container of the run starts from."""
    spec = job.spec
    with ui.NodeBoard(f"image for {spec.name}", [n.name for n in nodes]) as board:
        if spec.image.pull:
            return _pull_everywhere(inv, nodes, spec.image.pull, board)
        tag = f"trainrig/{spec.name}:{run_id}"
        image_id = _build(inv, job, nodes[0], tag, run_dir, board)
        others = nodes[1:]
        target = registry(inv)
        if others and target:
            _through_registry(inv, nodes[0], others, tag, image_id, target, board)
        elif others:
            ssh.on_nodes(others, lambda n: _save_load(inv, nodes[0], n, image_id, board))
        board.update(nodes[0].name, f"[green]built[/] {image_id[:19]}")
        return image_id


def _pull_everywhere(inv: Inventory, nodes: list[Node], reference: str, board: ui.NodeBoard) -> str:
    def pull(node: Node) -> str:
        board.update(node.name, f"pulling {reference}")
        with ssh.open_checked(inv, node) as conn:
            image_id = _docker_pull(conn, node, reference, board, f"{node.name}: docker pull {reference}")
        board.update(node.name, f"[green]pulled[/] {image_id[:19]}")
        return image_id

    ids = ssh.on_nodes(nodes, pull)
    if len(set(ids.values())) > 1:
        first, *rest = ids.items()
        odd = next(name for name, i in rest if i != first[1])
        raise TrainrigError(
            f"{odd}: {reference} is a different image there than on {first[0]} (a tag moved while "
            "the nodes pulled); pin it by digest: image.pull: name@sha256:..."
        )
    return next(iter(ids.values()))


def _build(inv: Inventory, job: jobs.LoadedJob, node: Node, tag: str, run_dir: str, board: ui.NodeBoard) -> str:
    build = job.spec.image.build
    assert build is not None and job.build_context is not None
    context = f"{run_dir}/image"
    with ssh.open_checked(inv, node) as conn:
        board.update(node.name, "sending the build context")
        transfer.upload_tree(conn.sftp(), job.build_context, context)
        _send_stand_ins(inv, conn, node, base_images(job.build_context / build.dockerfile, build.args), board)
        board.update(node.name, "building")
        argv = ["docker", "build", "--tag", tag, "--file", f"{context}/{build.dockerfile}"]
        for name, value in sorted(build.args.items()):
            argv += ["--build-arg", f"{name}={value}"]
        ssh.stream(
            conn,
            [*argv, context],
            lambda line: board.update(node.name, f"building: {ui.plain(line)}"),
            timeout=BUILD_TIMEOUT,
            what=f"{node.name}: docker build of {job.spec.name}",
        )
        return _image_id(conn, tag, node)


def base_images(dockerfile: Path, args: dict[str, str]) -> list[str]:
    """The images a Dockerfile starts FROM, with ARG defaults and build args filled in (stage names left out)."""
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    found: list[str] = []
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        arg = re.match(r"(?i)^ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?", line)
        if arg:
            defaults[arg.group(1)] = (arg.group(2) or "").strip("\"'")
            continue
        source = re.match(r"(?i)^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line)
        if source:
            values = {**defaults, **args}
            image = re.sub(
                r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m, v=values: v.get(m.group(1), ""), source.group(1)
            )
            if image not in stages and image.lower() != "scratch":
                found.append(image)
            if source.group(2):
                stages.add(source.group(2))
    return found


def _send_stand_ins(inv: Inventory, conn, node: Node, references: list[str], board: ui.NodeBoard) -> None:
    cloud = clouds.get(inv.cloud)
    for reference in references:
        if ssh.run(conn, ["docker", "image", "inspect", reference], check=False).exited == 0:
            continue
        local = cloud.stand_in_image(reference)
        if local is None:
            continue  # the node pulls it from its registry during the build
        board.update(node.name, f"sending {reference} (this cloud reaches no public registry)")
        with subprocess.Popen(["docker", "save", local], stdout=subprocess.PIPE) as save:
            assert save.stdout is not None
            ssh.send(
                conn,
                ["docker", "load"],
                save.stdout,
                timeout=TRANSFER_TIMEOUT,
                what=f"{node.name}: docker load",
                progress=lambda sent, r=reference: board.update(node.name, f"sending {r}: {sent / 1e6:.0f} MB"),
            )
        if save.returncode != 0:
            raise TrainrigError(f"docker save {local} failed on this machine; rebuild it with: make image")
        ssh.run(conn, ["docker", "tag", local, reference], what=f"{node.name}: naming {reference}")


def _through_registry(inv, build_node: Node, others: list[Node], tag: str, image_id: str, target: str, board) -> None:
    remote = f"{target}/{tag}"
    with ssh.open_checked(inv, build_node) as conn:
        board.update(build_node.name, f"pushing to {target}")
        ssh.run(conn, ["docker", "tag", tag, remote], what=f"{build_node.name}: docker tag")
        ssh.stream(
            conn,
            ["docker", "push", remote],
            lambda line: board.update(build_node.name, f"push: {ui.plain(line)}"),
            timeout=TRANSFER_TIMEOUT,
            what=f"{build_node.name}: docker push to the registry on the storage node",
        )

    def pull(node: Node) -> None:
        with ssh.open_checked(inv, node) as conn:
            board.update(node.name, f"pulling from {target}")
            pulled = _docker_pull(
                conn, node, remote, board, f"{node.name}: docker pull from the registry on the storage node"
            )
            if pulled != image_id:
                raise TrainrigError(
                    f"{node.name}: the registry served {pulled[:19]}, not the image just built "
                    f"({image_id[:19]}); run fab train again"
                )
            ssh.run(conn, ["docker", "tag", remote, tag], what=f"{node.name}: docker tag")
        board.update(node.name, f"[green]pulled[/] {image_id[:19]}")

    ssh.on_nodes(others, pull)


def _save_load(inv: Inventory, source: Node, node: Node, image_id: str, board: ui.NodeBoard) -> None:
    with ssh.open_checked(inv, node) as conn:
        if ssh.run(conn, ["docker", "image", "inspect", image_id], check=False).exited == 0:
            board.update(node.name, "[green]has it[/]")
            return
    board.update(node.name, f"streaming from {source.name}")
    with ssh.open_checked(inv, source) as conn:
        # Node to node over the cluster's mesh (pinned keys in the system known_hosts), not through the operator.
        ssh.run(
            conn,
            [
                "sh",
                "-c",
                'docker save "$1" | ssh -o BatchMode=yes -o StrictHostKeyChecking=yes "$2" docker load',
                "save-load",
                image_id,
                node.name,
            ],
            timeout=TRANSFER_TIMEOUT,
            what=f"streaming the image from {source.name} to {node.name}",
        )
    board.update(node.name, f"[green]loaded[/] {image_id[:19]}")


def _docker_pull(conn, node: Node, reference: str, board: ui.NodeBoard, what: str) -> str:
    """Pull on the node with docker's progress on its board line; the id of what arrived."""
    ssh.stream(
        conn,
        ["docker", "pull", reference],
        lambda line: board.update(node.name, ui.plain(line)),
        timeout=TRANSFER_TIMEOUT,
        what=what,
    )
    return _image_id(conn, reference, node)


def _image_id(conn, reference: str, node: Node) -> str:
    out = ssh.run(conn, ["docker", "image", "inspect", "--format", "{{.Id}}", reference], check=False)
    if out.exited != 0:
        raise TrainrigError(f"{node.name}: image {reference} is not there after the transfer; see docker's log there")
    return out.stdout.strip()
