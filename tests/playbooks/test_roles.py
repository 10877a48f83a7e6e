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
