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
    """Secure Boot refused first, headers before the DKMS build, nouveau out of the way, the
    repository's keyring before its packages, the packages held, then the check and the daemons."""
    tasks = yaml.safe_load((PLAYBOOKS / "roles" / "nvidia_driver" / "tasks" / "main.yml").read_text())
    names = _task_names(tasks)
    order = [
        "Look for a driver that is already loaded",
        "Refuse a host with Secure Boot on (the DKMS-built module is unsigned and would not load)",
        "Install the kernel headers the driver builds against",
        "Keep nouveau from binding the GPUs",
        "Install NVIDIA's cuda-keyring (the CUDA repository's key and apt source)",
        "Install the driver branch (and the fabric manager on NVSwitch hosts)",
        "Hold the driver (and fabric manager) packages at the installed version",
        "Verify the driver with nvidia-smi",
        "Run the NVIDIA persistence daemon and start it at boot",
        "Run the NVIDIA fabric manager and start it at boot",
    ]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    defaults = yaml.safe_load((PLAYBOOKS / "roles" / "nvidia_driver" / "defaults" / "main.yml").read_text())
    assert defaults["nvidia_driver_branch"] == "580" and defaults["nvidia_driver_keep_existing"] is True


def test_docker_waits_for_the_data_disk_and_keeps_containers_across_restarts():
    tasks = (PLAYBOOKS / "roles" / "docker" / "tasks" / "main.yml").read_text()
    assert "RequiresMountsFor={{ docker_data_root }}" in tasks
    assert tasks.index("RequiresMountsFor") < tasks.index("Install the Docker engine"), "before dockerd first starts"
    defaults = yaml.safe_load((PLAYBOOKS / "roles" / "docker" / "defaults" / "main.yml").read_text())
    assert defaults["docker_live_restore"] is True
