"""`fab provision`: playbooks/site.yml through ansible-runner, all hosts at once, pinned host keys."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner
import yaml
from rich.table import Table
from rich.text import Text

from cluster import phases as phases_mod
from cluster.images import REGISTRY_PORT
from infra import clouds, state, ui
from infra import inventory as inventory_mod
from infra.commands import run
from infra.errors import TrainrigError
from infra.inventory import Inventory

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"
APT_CACHE_PORT = 3142  # apt_cache role's apt_cache_port
PHASES = phases_mod.phases(PLAYBOOKS / "site.yml")
# What AWS recommends for EFS (NFS 4.1, 1 MiB transfers, long timeouts, a fresh port on
# reconnect), plus ours: mounted on first access, never blocking boot.
EFS_MOUNT_OPTIONS = (
    "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev,nofail,x-systemd.automount"
)


def ansible_inventory(
    inv: Inventory, host_vars: dict[str, dict] | None = None, due: dict[str, list[str]] | None = None
) -> dict:
    """The trainrig inventory as Ansible's: one host per node, grouped by role; host_vars per node.

    Each phase of site.yml also has a group, phase_<name>, of the nodes that run it; `due` says
    which phases each node needs (cluster/phases.py), and without it every node runs every phase.
    """
    nodes = [{"name": n.name, "private_address": str(n.private_address), "host_key": n.host_key} for n in inv.nodes]
    hosts = {
        n.name: {
            "ansible_host": n.public_address,
            "ansible_port": n.ssh_port,
            "trainrig_role": n.role,
            "trainrig_gpu_count": n.gpu_count,
            "trainrig_gpu_model": n.gpu_model,
            "trainrig_data_disks": [d.model_dump() for d in n.data_disks],
            **(host_vars or {}).get(n.name, {}),
        }
        for n in inv.nodes
    }
    groups: dict[str, dict[str, dict]] = {
        role: {"hosts": {n.name: {} for n in inv.nodes if n.role == role}} for role in ("gpu", "storage")
    }
    for phase in PHASES:
        members = [n.name for n in inv.nodes if due is None or phase.name in due.get(n.name, [])]
        groups[phase.group] = {"hosts": {name: {} for name in members}}
    variables: dict[str, Any] = {
        "ansible_user": inv.ssh_user,
        "ansible_ssh_private_key_file": str(inv.ssh_private_key),
        "ansible_python_interpreter": "/usr/bin/python3",
        "trainrig_cluster": inv.cluster,
        "trainrig_cloud": inv.cloud,
        # Whether containers may lift the locked-memory limit (NCCL, RDMA): the docker role's default.
        "trainrig_memlock": "memlock" in clouds.get(inv.cloud).capabilities,
        "trainrig_nodes": nodes,
    }
    if inv.ssh_user != "root":
        # A login such as ubuntu: every role changes the system, so every task goes through sudo.
        variables["ansible_become"] = True
    if inv.network:
        variables["trainrig_network_cidr"] = str(inv.network.cidr)
    if inv.admin_cidr:
        # Where SSH comes from (role common keeps a node's own firewall to it, on clouds that use one).
        variables["trainrig_admin_cidr"] = str(inv.admin_cidr)
    # No storage node, no trainrig_storage: the NFS roles then fail with a line that says so.
    server = inv.storage_node
    if inv.storage and inv.storage.kind == "efs":
        variables["trainrig_storage"] = {
            "server": "",
            "server_address": inv.storage.server,
            "export": inv.storage.export,
            "mount_point": inv.storage.mount_point,
            "mount_options": EFS_MOUNT_OPTIONS,
        }
    elif server and inv.storage:
        # The private registry that job images travel through (the image_registry role runs it) and
        # the package cache every GPU node fetches through (apt_cache and apt_proxy roles), both by
        # the storage node's name, which every node's /etc/hosts maps to its private address (role
        # cluster_hosts): a GPU node's Docker and apt settings are then the same in every cluster,
        # so the phases that write them stay done on a node started from a baked image.
        variables["trainrig_registry"] = f"{server.name}:{REGISTRY_PORT}"
        variables["trainrig_apt_cache"] = f"{server.name}:{APT_CACHE_PORT}"
        variables["trainrig_storage"] = {
            "server": server.name,
            "server_address": str(server.private_address),
            "export": inv.storage.export,
            "mount_point": inv.storage.mount_point,
        }
    return {"all": {"hosts": hosts, "children": groups, "vars": variables}}


# How Ansible runs the tasks of a play across the hosts. Mitogen's strategies run each host's
# tasks in one Python interpreter kept on the node, reached over one SSH connection, instead of
# a new interpreter per task (measured with the benchmark at 4 nodes: 95 s against 151.5 s on a
# first run, 38 s against 86 s when every task runs, the nodes' CPU 12.7 s against 62.9 s).
# Ansible's own linear (or free) strategy stays one setting away, for a node Mitogen cannot
# serve: TRAINRIG_ANSIBLE_STRATEGY=linear.
STRATEGIES = ("mitogen_linear", "mitogen_free", "linear", "free")
DEFAULT_STRATEGY = "mitogen_linear"
STRATEGY_ENV = "TRAINRIG_ANSIBLE_STRATEGY"


def strategy() -> str:
    """The strategy chosen by TRAINRIG_ANSIBLE_STRATEGY, Mitogen's linear one by default."""
    name = os.environ.get(STRATEGY_ENV, "").strip() or DEFAULT_STRATEGY
    if name not in STRATEGIES:
        choices = ", ".join(STRATEGIES)
        raise TrainrigError(f"{STRATEGY_ENV}={name!r} is not a strategy trainrig runs; use one of {choices}")
    return name


def strategy_env(name: str) -> dict[str, str]:
    """Ansible's settings for a strategy: Mitogen's need its plugin folder, Ansible's own need nothing."""
    if not name.startswith("mitogen_"):
        return {"ANSIBLE_STRATEGY": name}
    spec = importlib.util.find_spec("ansible_mitogen")
    if spec is None or spec.origin is None:
        raise TrainrigError(
            f"the mitogen package is missing (strategy {name}): reinstall trainrig, or set {STRATEGY_ENV}=linear"
        )
    return {
        "ANSIBLE_STRATEGY": name,
        "ANSIBLE_STRATEGY_PLUGINS": str(Path(spec.origin).parent / "plugins" / "strategy"),
    }


def ansible_env(inv: Inventory) -> dict[str, str]:
    """Settings chosen for speed (Mitogen, forks, pipelining, ControlPersist) with host keys pinned.

    Mitogen starts ssh itself with these same ANSIBLE_SSH_ARGS, the user's key and
    StrictHostKeyChecking=yes of its own (ANSIBLE_HOST_KEY_CHECKING), so the cluster's pinned
    known_hosts is what it trusts, as plain Ansible does.
    """
    known_hosts = inventory_mod.write_known_hosts(inv)
    control = control_dir()
    ssh_args = [
        "-o ControlMaster=auto",
        "-o ControlPersist=120s",
        f"-o UserKnownHostsFile={known_hosts}",
        "-o StrictHostKeyChecking=yes",
        "-o IdentitiesOnly=yes",
        "-o ConnectTimeout=15",
    ]
    return {
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_ARGS": " ".join(ssh_args),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
        # ssh's own %C (a hash of the connection), so close_connection can name a master.
        "ANSIBLE_SSH_CONTROL_PATH": "%(directory)s/%%C",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_FORKS": str(max(5, len(inv.nodes))),
        # Facts once per host, cached per cluster across runs (dropped when the node changes:
        # _forget_stale_facts); each play asks for the minimal subset only.
        "ANSIBLE_GATHERING": "smart",
        "ANSIBLE_CACHE_PLUGIN": "jsonfile",
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(facts_dir(inv.cluster)),
        "ANSIBLE_CACHE_PLUGIN_TIMEOUT": "86400",
        "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "True",
        # Ansible 2.19 warns of every strategy not its own (Mitogen's): one warning per run, not news.
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        **strategy_env(strategy()),
        # ansible-runner starts ansible-playbook by name: the one beside this Python.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def control_dir() -> Path:
    """Where SSH keeps its ControlPersist sockets between tasks and between runs."""
    # Unix socket paths are short (108 bytes): keep the control sockets out of deep test dirs.
    path = Path(tempfile.gettempdir()) / f"trainrig-cp-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    # The temp folder is shared: a folder of that name made by someone else (or open to them)
    # could hold a socket that poses as a master connection to our nodes. Never reuse one.
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise TrainrigError(
            f"{path} (SSH connection sharing) is not a folder that only you own and use; remove it and run again"
        )
    return path


def close_connection(inv: Inventory, node) -> None:
    """End Ansible's persistent SSH master to a node (it outlives sshd restarts otherwise)."""
    run(
        [
            "ssh",
            "-O",
            "exit",
            "-o",
            f"ControlPath={control_dir()}/%C",
            "-p",
            str(node.ssh_port),
            f"{inv.ssh_user}@{node.public_address}",
        ],
        check=False,
        timeout=30,
    )


def cluster_vars_path(cluster: str) -> Path:
    """Optional per-cluster Ansible variables (a YAML mapping), e.g. the registry to log in to."""
    return state.cluster_dir(cluster) / "provision-vars.yml"


def cluster_vars(cluster: str) -> dict:
    path = cluster_vars_path(cluster)
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainrigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TrainrigError(f"{path}: must be a mapping of Ansible variable names to values")
    return data


@dataclass
class HostRecap:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: int = 0
    message: str = ""
    # What file-writing tasks wrote, or in check mode would write: path -> new content.
    files: dict[str, str] = field(default_factory=dict)
    # The tasks that changed something, or in check mode would: what a drift check reports.
    changes: list[str] = field(default_factory=list)
    # The phases run there, in order (all of the node's when the run did not go by the phase
    # records), and those its records showed up to date.
    phases: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return not (self.failed or self.unreachable)


@dataclass
class Recap:
    hosts: dict[str, HostRecap] = field(default_factory=dict)
    complete: bool = False  # Ansible's PLAY RECAP came: every host's outcome is known

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
        if event.get("event") == "playbook_on_stats":
            self._final_counts(data)
            return True
        host = data.get("host")
        if not host or host not in self.recap.hosts:
            return True
        rec = self.recap.hosts[host]
        kind = event.get("event", "")
        task = data.get("task", "")
        if kind == "runner_on_start":
            self.board.update(host, f"{ui.plain(task)} …")
        elif kind == "runner_on_ok":
            _record_files(rec, data.get("res", {}))
            if data.get("res", {}).get("changed"):
                rec.changes.append(task)
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            rec.failed += 1
            rec.message = _first_line(data.get("res", {}).get("msg", "failed"), task)
            self.board.update(host, f"[red]failed[/]: {ui.plain(rec.message)}")
        elif kind == "runner_on_unreachable":
            rec.unreachable += 1
            rec.message = _first_line(data.get("res", {}).get("msg", "unreachable"), task)
            self.board.update(host, f"[red]unreachable[/]: {ui.plain(rec.message)}")
        return True

    def _final_counts(self, stats: dict) -> None:
        """Ansible's own PLAY RECAP numbers: they count no_log (censored) and looped tasks
        exactly, and leave out what a task chose to ignore (a peer that is down, read with
        ignore_unreachable). The per-event failures above only name the cause as it happens."""
        for host, rec in self.recap.hosts.items():
            rec.ok = stats.get("ok", {}).get(host, 0)
            rec.changed = stats.get("changed", {}).get(host, 0)
            rec.skipped = stats.get("skipped", {}).get(host, 0)
            rec.failed = stats.get("failures", {}).get(host, 0)
            rec.unreachable = stats.get("dark", {}).get(host, 0)
            if rec.succeeded:
                rec.message = ""
        self.recap.complete = True


def _record_files(rec: HostRecap, res: dict) -> None:
    diffs = res.get("diff") or []
    for diff in diffs if isinstance(diffs, list) else [diffs]:
        if isinstance(diff, dict) and diff.get("after_header") and isinstance(diff.get("after"), str):
            # A template's after_header names its source; the module's own arguments name the file.
            target = (
                res.get("dest")
                or res.get("path")
                or res.get("invocation", {}).get("dest")
                or diff.get("before_header")
                or diff["after_header"]
            ).split(" (")[0]
            rec.files[target] = diff["after"]


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
    host_vars: dict[str, dict] | None = None,
    check: bool = False,
    keep_artifacts: Path | None = None,
    settings: dict[str, str] | None = None,
    force: bool = False,
) -> Recap:
    """Run a playbook on every node in parallel; raise naming the hosts that failed.

    Variables come from the cluster's provision-vars.yml, then `extravars` on top; `host_vars`
    set variables for single nodes. `check` runs in check mode with diffs (nothing changes).
    `keep_artifacts` keeps ansible-runner's files (events, stdout) in that directory.
    `settings` overrides Ansible environment settings (the benchmark compares with defaults).

    A whole site.yml run gives each node only the phases whose inputs changed since their last
    success there (cluster/phases.py); `force` runs every phase, and records them again.
    """
    inventory_mod.require_running(inv)
    strategy()  # a strategy that does not exist stops us before any node is touched
    if not (PLAYBOOKS / playbook).is_file():
        raise TrainrigError(f"playbook {playbook} not found in {PLAYBOOKS}")
    extra = {**cluster_vars(inv.cluster), **(extravars or {})}  # a bad vars file stops us before any node
    with state.cluster_lock(inv.cluster, "provision"), _interrupts() as interrupted:
        targets = [n.name for n in inv.nodes]
        if retry_failed:
            # Only hosts that still exist: a node removed since then has nothing left to retry.
            targets = [h for h in _previously_failed(inv.cluster) if h in targets]
        _forget_stale_facts(inv)
        plan = _phase_plan(inv, host_vars, extra) if playbook == "site.yml" and not tags and not check else None
        due = None if plan is None or force else plan[0]
        up_to_date = [h for h in targets if due is not None and not due.get(h)]
        targets = [h for h in targets if h not in up_to_date]
        recap = Recap(hosts={h: _host_recap(inv, h, playbook, due) for h in targets}, complete=not targets)
        runner_status, error = "successful", ""
        if targets:
            runner_status, error = _run(
                inv, playbook, targets, recap, host_vars, extra, tags, check, due, keep_artifacts, settings, interrupted
            )
        for host in up_to_date:
            its_own = _phases_of(inv, host)
            recap.hosts[host] = HostRecap(
                message=f"up to date: its {len(its_own)} phases' inputs are unchanged", up_to_date=its_own
            )
        _print_recap(recap)
        # Without Ansible's final counts (interrupted, or Ansible died) no host is known to be
        # done: all of them are left for --retry-failed, never an empty list that resumes nothing.
        failed = recap.failed_hosts if recap.complete else sorted(targets)
        if not check:
            # What --retry-failed picks up; a rehearsal in check mode leaves it alone.
            state.write_atomic(failed_hosts_path(inv.cluster), json.dumps(failed))
        if plan is not None and recap.complete:
            phases_mod.record(inv, {h: plan[1][h] for h in targets if recap.hosts[h].succeeded and h in plan[1]})
        if interrupted.is_set():
            raise TrainrigError(
                f"provisioning interrupted: ansible-playbook stopped; finish it with: "
                f"fab provision --name {inv.cluster} --retry-failed",
                exit_code=130,
            )
        if error:
            # Not successful with no host to blame: the playbook itself is broken, or Ansible is.
            raise TrainrigError(f"ansible-playbook did not run ({runner_status}): {error}")
        if failed:
            raise ProvisionFailed(
                recap,
                f"provisioning failed on {', '.join(failed)}: {recap.hosts[failed[0]].message}; "
                f"fix it, then run: fab provision --name {inv.cluster} --retry-failed",
            )
    return recap


def check_drift(inv: Inventory) -> dict[str, list[str]]:
    """Every phase on every node in check mode, records ignored: the tasks that would change, per node, shown.

    Phase records only know what trainrig changed; this finds what someone changed by hand.
    """
    recap = provision(inv, check=True)
    drift = {host: r.changes for host, r in recap.hosts.items() if r.changes}
    if not drift:
        ui.console.print(f"no drift: every task on every node of {inv.cluster} is as provisioned")
        return drift
    table = Table(title="drift: what provisioning would change", title_justify="left")
    table.add_column("host")
    table.add_column("task")
    for host, tasks in drift.items():
        for task in tasks:
            table.add_row(host, ui.plain(task))
    ui.console.print(table)
    return drift


def _run(
    inv, playbook, targets, recap, host_vars, extra, tags, check, due, keep_artifacts, settings, interrupted
) -> tuple[str, str]:
    """One ansible-playbook run over `targets` with a live line per host.

    Returns the runner's status and, when it failed with no host to blame, Ansible's own error.
    """
    with contextlib.ExitStack() as stack:
        private_dir = (
            str(keep_artifacts)
            if keep_artifacts
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="trainrig-ansible-"))
        )
        with ui.NodeBoard(f"provisioning {inv.cluster} ({playbook})", targets) as board:
            runner = ansible_runner.run(
                private_data_dir=private_dir,
                project_dir=str(PLAYBOOKS),
                playbook=str(PLAYBOOKS / playbook),
                inventory=ansible_inventory(inv, host_vars, due),
                envvars={**ansible_env(inv), **(settings or {})},
                extravars=extra,
                cmdline="--check --diff" if check else None,
                limit=",".join(targets),
                tags=tags,
                quiet=True,
                # Ctrl-C never reaches ansible-playbook (it runs in its own terminal): the
                # runner stops it when asked, so no task goes on after the user said stop.
                cancel_callback=interrupted.is_set,
                event_handler=_Progress(board, recap),
                status_handler=_forget_environment,
            )
            for host, rec in recap.hosts.items():
                if rec.succeeded:
                    board.update(host, f"[green]done[/] ok={rec.ok} changed={rec.changed}")
        if interrupted.is_set():
            _stop_leftovers(private_dir)
        # Read while ansible-runner's files still exist.
        blameless = runner.status != "successful" and not recap.failed_hosts and not interrupted.is_set()
        return runner.status, _runner_error(runner) if blameless else ""


def _phase_plan(
    inv: Inventory, host_vars: dict[str, dict] | None, extra: dict
) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """(phases due per node, digests to record per node): what each node's records say against today's inputs."""
    states = phases_mod.read_state(inv, inv.nodes)
    _forget_stale_facts(inv, {name: found.host_facts for name, found in states.items() if found is not None})
    return phases_mod.due(inv, PHASES, phase_variables(inv, host_vars, extra), states)


def phase_variables(inv: Inventory, host_vars: dict[str, dict] | None = None, extra: dict | None = None) -> dict:
    """Each node's variables as its phases see them (the inventory's, then its own, then extra vars)."""
    ansible = ansible_inventory(inv, host_vars)["all"]
    roles = {role: sorted(ansible["children"][role]["hosts"]) for role in ("gpu", "storage")}
    return {
        name: {**ansible["vars"], **hostvars, **(extra or {}), "groups": roles}
        for name, hostvars in ansible["hosts"].items()
    }


def facts_dir(cluster: str) -> Path:
    """Ansible's fact cache for a cluster: facts are gathered once per node, not once per run."""
    return state.cluster_dir(cluster) / "facts"


def _forget_stale_facts(inv: Inventory, host_facts: Mapping[str, str] | None = None) -> None:
    """Drop a node's cached facts once it is another machine (new host key) or runs another kernel or OS."""
    cache = facts_dir(inv.cluster)
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    for node in inv.nodes:
        marker = cache / f".{node.name}.identity"
        before = marker.read_text() if marker.is_file() else ""
        facts = (host_facts or {}).get(node.name, before.partition("\n")[2])
        now = f"{node.host_key}\n{facts}"
        if now != before:
            (cache / node.name).unlink(missing_ok=True)
            marker.write_text(now)


@contextlib.contextmanager
def _interrupts() -> Iterator[threading.Event]:
    """Ctrl-C during a playbook sets an event (the runner polls it) instead of abandoning Ansible mid-task."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked  # signal handlers belong to the main thread; elsewhere there is no Ctrl-C to catch
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: asked.set())
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_leftovers(private_dir: str) -> None:
    """End what ansible-playbook left running when it was stopped: its workers and their tasks.

    ansible-runner kills ansible-playbook's process group, but each worker Ansible forks (and
    Mitogen's multiplexer) starts a session of its own, so they would go on running their task,
    and a local command of it, after the user said stop. They are found by the run's own
    inventory path on their command line and ended with their process group.
    """
    marker = os.path.join(private_dir, "inventory")
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone already, or not ours to read
        if not any(arg.startswith(marker) for arg in argv):
            continue
        pid = int(entry.name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)  # the worker and the task it started
            else:
                os.kill(pid, signal.SIGKILL)


def _forget_environment(status: dict, runner_config) -> None:
    """Remove ansible-runner's record of the environment as soon as Ansible has started.

    ansible-runner writes the whole process environment (cloud keys, the registry secret) to
    artifacts/<id>/command before it starts ansible-playbook; nothing reads it back, and a
    secret has no business on disk, even in a 0700 temp dir, for the length of a run.
    """
    if status.get("status") == "running":
        Path(runner_config.artifact_dir, "command").unlink(missing_ok=True)


class ProvisionFailed(TrainrigError):
    """Some hosts failed or were unreachable; `recap` tells each host's outcome."""

    def __init__(self, recap: Recap, message: str):
        super().__init__(message)
        self.recap = recap


def _previously_failed(cluster: str) -> list[str]:
    path = failed_hosts_path(cluster)
    try:
        hosts = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        hosts = None
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise TrainrigError(
            f"{path} is damaged (not a JSON list of host names): delete it and provision every host with "
            f"fab provision --name {cluster}"
        )
    if not hosts:
        raise TrainrigError(f"no failed hosts recorded for {cluster!r}: run `fab provision --name {cluster}`")
    return hosts


def _runner_error(runner) -> str:
    out = runner.stdout.read() if runner.stdout else ""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line]
    # Ansible's first ERROR line says what broke; without one, its last words.
    line = errors[0] if errors else lines[-1] if lines else f"rc={runner.rc}"
    return line[:300]


def _phases_of(inv: Inventory, host: str) -> list[str]:
    """The phases whose plays are for this node's role, in order."""
    return [p.name for p in PHASES if p.applies_to(inv.node(host).role)]


def _host_recap(inv: Inventory, host: str, playbook: str, due: dict[str, list[str]] | None) -> HostRecap:
    """A host's recap before the run: which of its phases run (site.yml), and which are up to date."""
    if playbook != "site.yml":
        return HostRecap()
    its_own = _phases_of(inv, host)
    running = its_own if due is None else due.get(host, its_own)
    return HostRecap(phases=running, up_to_date=[p for p in its_own if p not in running])


def _print_recap(recap: Recap) -> None:
    table = Table(title="recap", title_justify="left")
    for column in ("host", "ok", "changed", "failed", "unreachable", "skipped", "note"):
        table.add_column(column, justify="right" if column not in ("host", "note") else "left")
    for host, r in recap.hosts.items():
        note = r.message or (f"{len(r.up_to_date)} phases up to date" if r.up_to_date else "")
        row = (host, str(r.ok), str(r.changed), str(r.failed), str(r.unreachable), str(r.skipped), note)
        table.add_row(*(Text(cell) for cell in row))  # Ansible's words, shown as they are: never markup
    ui.console.print(table)
