"""Run one task file of a role on the operator's own machine (connection local), with stand-in
commands first on PATH: the role's logic runs for real while nothing of the machine is touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"


def run_tasks(
    tmp_path: Path,
    role: str,
    tasks_from: str,
    stand_ins: dict[str, str],
    extra_vars: dict,
    hosts: tuple[str, ...] = ("localhost",),
    succeed: bool = True,
) -> subprocess.CompletedProcess:
    """Write each stand-in (name: shell script) into a bin folder and run `role`'s `tasks_from` with
    `extra_vars` on `hosts` (each one this machine); unless `succeed` is False, a failed play fails
    the test with the end of Ansible's output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: all\n  connection: local\n  gather_facts: false\n  tasks:\n"
        f"    - ansible.builtin.include_role: {{name: {role}, tasks_from: {tasks_from}}}\n"
    )
    venv_bin = Path(sys.executable).parent
    # Hosts other than localhost would have Ansible look for a Python of their own: use this one.
    variables = {"ansible_python_interpreter": sys.executable, **extra_vars}
    result = subprocess.run(
        [venv_bin / "ansible-playbook", "-i", ",".join(hosts) + ",", str(play), "-e", json.dumps(variables)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
            "PATH": f"{bin_dir}:{venv_bin}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        },
    )
    if succeed:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result
