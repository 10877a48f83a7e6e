"""`fab provision`: playbooks/site.yml through ansible-runner, all hosts at once, pinned host keys."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ansible_runner
from rich.table import Table

from cluster import inventory as inventory_mod
from cluster import state, ui
from cluster.errors import TrainrigError
from cluster.inventory import Inventory

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"


def ansible_inventory(inv: Inventory) -> dict:
    """The trainrig inventory as Ansible's: one host per node, grouped by role."""
    nodes = [
        {"name": n.name, "private_address": str(n.private_address), "host_key": n.host_key} for n in inv.nodes
    ]
    hosts = {
        n.name: {"ansible_host": n.public_address, "ansible_port": n.ssh_port, "trainrig_role": n.role}
        for n in inv.nodes
    }
    groups = {role: {"hosts": {n.name: {} for n in inv.nodes if n.role == role}} for role in ("gpu", "storage")}
    return {
        "all": {
            "hosts": hosts,
            "children": groups,
            "vars": {
                "ansible_user": inv.ssh_user,
                "ansible_ssh_private_key_file": str(inv.ssh_private_key),
                "ansible_python_interpreter": "/usr/bin/python3",
                "trainrig_cluster": inv.cluster,
                "trainrig_nodes": nodes,
            },
        }
    }


def ansible_env(inv: Inventory) -> dict[str, str]:
    """Settings chosen for speed (forks, pipelining, ControlPersist) with host keys pinned."""
    known_hosts = inventory_mod.write_known_hosts(inv)
    # Unix socket paths are short (108 bytes): keep the control sockets out of deep test dirs.
    control_dir = Path(tempfile.gettempdir()) / f"trainrig-cp-{os.getuid()}"
    control_dir.mkdir(mode=0o700, exist_ok=True)
    ssh_args = [
        "-o ControlMaster=auto", "-o ControlPersist=120s",
        f"-o UserKnownHostsFile={known_hosts}", "-o StrictHostKeyChecking=yes",
        "-o IdentitiesOnly=yes", "-o ConnectTimeout=15",
    ]
    return {
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_ARGS": " ".join(ssh_args),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_FORKS": str(max(5, len(inv.nodes))),
        "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        # ansible-runner starts ansible-playbook by name: the one beside this Python.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@dataclass
class HostRecap:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: int = 0
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return not (self.failed or self.unreachable)


@dataclass
class Recap:
    hosts: dict[str, HostRecap] = field(default_factory=dict)

    @property
    def failed_hosts(self) -> list[str]:
        return sorted(h for h, r in self.hosts.items() if not r.succeeded)


class _Progress:
    """Turns ansible-runner events into live per-host lines and the per-host recap."""

    def __init__(self, board: ui.NodeBoard, recap: Recap):
        self.board = board
        self.recap = recap

    def __call__(self, event: dict) -> bool:
        data = event.get("event_data", {})
        host = data.get("host")
        if not host or host not in self.recap.hosts:
            return True
        rec = self.recap.hosts[host]
        kind = event.get("event", "")
        task = data.get("task", "")
        if kind == "runner_on_start":
            self.board.update(host, f"{task} …")
        elif kind == "runner_on_ok":
            rec.ok += 1
            rec.changed += bool(data.get("res", {}).get("changed"))
        elif kind == "runner_on_skipped":
            rec.skipped += 1
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            rec.failed += 1
            rec.message = _first_line(data.get("res", {}).get("msg", "failed"), task)
            self.board.update(host, f"[red]failed[/]: {rec.message}")
        elif kind == "runner_on_unreachable":
            rec.unreachable += 1
            rec.message = _first_line(data.get("res", {}).get("msg", "unreachable"), task)
            self.board.update(host, f"[red]unreachable[/]: {rec.message}")
        return True


def _first_line(message, task: str) -> str:
    text = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    return f"{task}: {text}"[:160]


def failed_hosts_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "provision-failed.json"


def provision(
    inv: Inventory,
    *,
    playbook: str = "site.yml",
    tags: str | None = None,
    retry_failed: bool = False,
    extravars: dict | None = None,
) -> Recap:
    """Run a playbook on every node in parallel; raise naming the hosts that failed."""
    inventory_mod.require_running(inv)
    if not (PLAYBOOKS / playbook).is_file():
        raise TrainrigError(f"playbook {playbook} not found in {PLAYBOOKS}")
    targets = [n.name for n in inv.nodes]
    if retry_failed:
        targets = _previously_failed(inv.cluster)
    recap = Recap(hosts={h: HostRecap() for h in targets})
    with tempfile.TemporaryDirectory(prefix="trainrig-ansible-") as private_dir:
        with ui.NodeBoard(f"provisioning {inv.cluster} ({playbook})", targets) as board:
            runner = ansible_runner.run(
                private_data_dir=private_dir,
                project_dir=str(PLAYBOOKS),
                playbook=str(PLAYBOOKS / playbook),
                inventory=ansible_inventory(inv),
                envvars=ansible_env(inv),
                extravars=extravars or {},
                limit=",".join(targets),
                tags=tags,
                quiet=True,
                event_handler=_Progress(board, recap),
            )
            for host, rec in recap.hosts.items():
                if rec.succeeded:
                    board.update(host, f"[green]done[/] ok={rec.ok} changed={rec.changed}")
    _print_recap(recap)
    failed = recap.failed_hosts
    state.write_atomic(failed_hosts_path(inv.cluster), json.dumps(failed))
    if runner.status not in ("successful", "failed") and not failed:
        raise TrainrigError(f"ansible-playbook did not run ({runner.status}): {_runner_error(runner)}")
    if failed:
        raise TrainrigError(
            f"provisioning failed on {', '.join(failed)}: {recap.hosts[failed[0]].message}; "
            f"fix it, then run: fab provision --name {inv.cluster} --retry-failed"
        )
    return recap


def _previously_failed(cluster: str) -> list[str]:
    path = failed_hosts_path(cluster)
    hosts = json.loads(path.read_text()) if path.is_file() else []
    if not hosts:
        raise TrainrigError(f"no failed hosts recorded for {cluster!r}: run `fab provision --name {cluster}`")
    return hosts


def _runner_error(runner) -> str:
    out = runner.stdout.read() if runner.stdout else ""
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else f"rc={runner.rc}"


def _print_recap(recap: Recap) -> None:
    table = Table(title="recap", title_justify="left")
    for column in ("host", "ok", "changed", "failed", "unreachable", "skipped", "note"):
        table.add_column(column, justify="right" if column not in ("host", "note") else "left")
    for host, r in recap.hosts.items():
        table.add_row(host, str(r.ok), str(r.changed), str(r.failed), str(r.unreachable), str(r.skipped), r.message)
    ui.console.print(table)
