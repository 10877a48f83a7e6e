"""Which provisioning phases each node still needs, so a run that would change nothing runs nothing.

A phase is one playbook that site.yml imports (common, docker, nfs, ...). Its inputs are its
playbook, the roles it names (and the roles those name), the values of the variables its files
read, and the node's kernel and OS release. After a run that succeeded on a node, the digest of
each phase's inputs is written on that node (RECORDS/<phase>). The next run reads the records
back over SSH and gives Ansible only the phases whose digest changed: a new node, an edited
role, a changed variable, a kernel upgrade. Records live on the node, not on the operator's
machine, so a node that was replaced (or whose disk was wiped) starts from nothing, and two
operators of one cluster agree on what is done.

Not covered by a digest: a change made by hand on a node. `fab provision --check-drift` finds
those, and `--force` runs every phase again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from infra import ssh
from infra.errors import TrainrigError
from infra.inventory import Inventory, Node

RECORDS = "/var/lib/trainrig/phases"
# The node's side of a phase's inputs: its kernel (drivers build against it) and its OS release.
HOST_FACTS = 'uname -r; . /etc/os-release && echo "$ID $VERSION_ID"'
READ = f'{HOST_FACTS}; echo "--"; cd {RECORDS} 2>/dev/null && grep -H . -- * 2>/dev/null; true'
WRITE = 'd=$1; shift; mkdir -p "$d"; while [ $# -gt 1 ]; do printf "%s\\n" "$2" > "$d/$1"; shift 2; done'
_USES = r"^\s*-?\s*role:\s*[\"']?{role}[\"']?\s*$|_role:\s*\n\s*name:\s*[\"']?{role}[\"']?\s*$"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Phase:
    name: str  # the playbook's stem, also its inventory group: phase_<name>
    files: tuple[Path, ...]
    roles: tuple[str, ...] = ("all",)  # the node roles its plays run on (gpu, storage; all)

    @property
    def group(self) -> str:
        return f"phase_{self.name}"

    def applies_to(self, role: str) -> bool:
        return "all" in self.roles or role in self.roles

    def text(self) -> str:
        return "".join(path.read_text() for path in self.files)


@dataclass(frozen=True)
class NodeState:
    host_facts: str  # kernel and OS release, as the node reports them
    recorded: dict[str, str]  # phase -> the digest of its inputs at its last success there


def phases(site: Path) -> list[Phase]:
    """The phases site.yml imports, in order, each with the files that define it."""
    plays = yaml.safe_load(site.read_text()) or []
    roles_dir = site.parent / "roles"
    roles = sorted(p.name for p in roles_dir.iterdir() if p.is_dir())
    found = []
    for play in plays:
        playbook = site.parent / play["ansible.builtin.import_playbook"]
        # Each play's hosts are "<role>:&phase_<name>": the role part says which nodes it is for.
        targets = tuple(dict.fromkeys(p["hosts"].split(":&")[0] for p in yaml.safe_load(playbook.read_text())))
        found.append(Phase(playbook.stem, tuple(_files(playbook, roles_dir, roles)), targets))
    return found


def _files(playbook: Path, roles_dir: Path, roles: list[str]) -> list[Path]:
    """The playbook and every role it uses, followed through roles that use others (dependencies, include_role).

    A role is used where a line says `role: NAME` (plays, meta dependencies) or where
    include_role/import_role names it; a role that is only mentioned (a service called docker)
    is not an input.
    """
    files = [playbook]
    seen: set[str] = set()
    pending = [playbook.read_text()]
    while pending:
        text = pending.pop()
        for role in roles:
            if role not in seen and re.search(_USES.format(role=re.escape(role)), text, re.M):
                seen.add(role)
                role_files = sorted(p for p in (roles_dir / role).rglob("*") if p.is_file())
                files += role_files
                pending += [p.read_text() for p in role_files]
    return files


def digest(phase: Phase, variables: dict, host_facts: str) -> str:
    """The digest of a phase's inputs on one node: its files, the variables they read, the node's kernel and OS."""
    text = phase.text()
    used = set(_NAME.findall(text))
    read = {name: value for name, value in sorted(variables.items()) if name in used}
    payload = json.dumps([text, read, host_facts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def read_state(inv: Inventory, nodes: list[Node]) -> dict[str, NodeState | None]:
    """Each node's host facts and phase records; None for a node that does not answer (Ansible reports it)."""

    def read(node: Node) -> NodeState | None:
        try:
            with ssh.open_checked(inv, node) as conn:
                out = ssh.run(conn, ["sh", "-c", READ], check=False, timeout=30).stdout
        except TrainrigError:
            return None
        facts, _, records = out.partition("--\n")
        recorded = {}
        for line in records.splitlines():
            name, sep, value = line.partition(":")
            if sep and _NAME.fullmatch(name):
                recorded[name] = value.strip()
        return NodeState(facts.strip(), recorded)

    return ssh.on_nodes(nodes, read)


def due(
    inv: Inventory, all_phases: list[Phase], variables: dict[str, dict], states: dict[str, NodeState | None]
) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """(phases to run per node, the digests to record per node once they succeed).

    A phase none of whose plays is for the node's role (the package cache on a GPU node) never runs
    there; its digest is recorded all the same, so every node's records name every phase.
    """
    to_run: dict[str, list[str]] = {}
    digests: dict[str, dict[str, str]] = {}
    for node in inv.nodes:
        state = states.get(node.name)
        its_own = [p for p in all_phases if p.applies_to(node.role)]
        if state is None:
            to_run[node.name] = [p.name for p in its_own]
            continue
        digests[node.name] = {p.name: digest(p, variables[node.name], state.host_facts) for p in all_phases}
        to_run[node.name] = [p.name for p in its_own if state.recorded.get(p.name) != digests[node.name][p.name]]
    return to_run, digests


def record(inv: Inventory, digests: dict[str, dict[str, str]]) -> None:
    """Write each node's phase digests after a run that succeeded there."""

    def write(node: Node) -> None:
        pairs = [item for name, value in sorted(digests[node.name].items()) for item in (name, value)]
        with ssh.open_checked(inv, node) as conn:
            ssh.run(conn, ["sh", "-c", WRITE, "record", RECORDS, *pairs], what=f"{node.name}: recording its phases")

    ssh.on_nodes([n for n in inv.nodes if n.name in digests], write)


def forget(inv: Inventory, nodes: list[Node], names: list[str]) -> None:
    """Drop some phase records, so those phases run again on those nodes (and only they)."""

    def clear(node: Node) -> None:
        with ssh.open_checked(inv, node) as conn:
            ssh.run(conn, ["rm", "-f", *(f"{RECORDS}/{name}" for name in names)], what=f"{node.name}: phase records")

    ssh.on_nodes(nodes, clear)
