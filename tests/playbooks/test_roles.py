"""Roles keep their argument specs equal to their defaults, and the playbooks parse."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
ROLES = sorted(p for p in (PLAYBOOKS / "roles").iterdir() if p.is_dir())


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_argument_specs_match_defaults(role):
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(options) == set(defaults)
    assert all(name.startswith(f"{role.name}_") for name in defaults), "variables carry the role's prefix"
    assert all(opt.get("description") for opt in options.values())


@pytest.mark.parametrize("playbook", sorted(PLAYBOOKS.glob("*.yml")), ids=lambda p: p.name)
def test_syntax_check(playbook):
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [bin_dir / "ansible-playbook", "--syntax-check", "-i", "localhost,", str(playbook)],
        capture_output=True,
        text=True,
        env={"ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"), "PATH": str(bin_dir)},
    )
    assert result.returncode == 0, result.stderr


def test_the_shared_export_is_sticky():
    """World-writable for squashed clients, but no one removes or renames another's files (or root's)."""
    defaults = yaml.safe_load((PLAYBOOKS / "roles" / "nfs_server" / "defaults" / "main.yml").read_text())
    assert int(defaults["nfs_server_export_mode"], 8) == 0o1777


def _task_names(tasks: list[dict]) -> list[str]:
    names = []
    for task in tasks:
        names.append(task.get("name", ""))
        names += _task_names(task.get("block", []))
    return names


def test_the_driver_is_installed_in_nvidia_s_order():
    """Secure Boot refused first, nouveau out of the way, the repository's keyring before its
    packages (the headers and dkms in the same install), the packages held, then the check and the daemons."""
    role_tasks = PLAYBOOKS / "roles" / "nvidia_driver" / "tasks"
    # main.yml includes driver.yml on hosts with GPUs: the order is that of the two files read in turn.
    tasks = [t for f in ("main.yml", "driver.yml") for t in yaml.safe_load((role_tasks / f).read_text())]
    names = _task_names(tasks)
    order = [
        "Look for a driver that is already loaded",
        "Refuse a host with Secure Boot on (the DKMS-built module is unsigned and would not load)",
        "Keep nouveau from binding the GPUs",
        "Install NVIDIA's cuda-keyring (the CUDA repository's key and apt source)",
        "Install the headers, dkms and the driver branch (and the NVSwitch fabric manager)",
        "Hold the driver (and fabric manager) packages at the installed version",
        "Verify the driver with nvidia-smi",
        "Run the NVIDIA persistence daemon and start it at boot",
        "Run the NVIDIA fabric manager and start it at boot",
    ]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    defaults = yaml.safe_load((PLAYBOOKS / "roles" / "nvidia_driver" / "defaults" / "main.yml").read_text())
    assert defaults["nvidia_driver_branch"] == "580" and defaults["nvidia_driver_keep_existing"] is True


def _apt_tasks(tasks: list[dict]) -> list[dict]:
    found = []
    for task in tasks:
        if "ansible.builtin.apt" in task:
            found.append(task["ansible.builtin.apt"])
        found += _apt_tasks(task.get("block", []))
    return found


@pytest.mark.parametrize("role", sorted(p.name for p in (PLAYBOOKS / "roles").iterdir() if p.is_dir()))
def test_one_package_install_per_role(role):
    """Each apt run costs a dpkg lock, a cache read and a task: a role installs its packages in one.
    The only other one is NVIDIA's keyring .deb, which must come before the repository's packages."""
    installs = [
        args
        for path in sorted((PLAYBOOKS / "roles" / role / "tasks").glob("*.yml"))
        for args in _apt_tasks(yaml.safe_load(path.read_text()) or [])
    ]
    assert len([args for args in installs if "name" in args]) <= 1
    assert [args for args in installs if "name" not in args] == (
        [{"deb": "{{ nvidia_driver_repo_base }}/{{ nvidia_driver_keyring_package }}", "state": "present"}]
        if role == "nvidia_driver"
        else []
    )


def test_docker_waits_for_the_data_disk_and_keeps_containers_across_restarts():
    tasks = (PLAYBOOKS / "roles" / "docker" / "tasks" / "main.yml").read_text()
    assert "RequiresMountsFor={{ docker_data_root }}" in tasks
    assert tasks.index("RequiresMountsFor") < tasks.index("Install the Docker engine"), "before dockerd first starts"
    defaults = yaml.safe_load((PLAYBOOKS / "roles" / "docker" / "defaults" / "main.yml").read_text())
    assert defaults["docker_live_restore"] is True
