"""Role common on a fresh cloud image, run on the operator's machine (connection local) against
stand-in systemctl and cloud-init, with needrestart's directory in a temporary folder: nothing of
the machine itself is touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"

FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "{log}"
case "$1" in
  list-unit-files) [ "$3" = "apt-daily.timer" ] && echo "apt-daily.timer enabled enabled"; exit 0 ;;
  show) printf 'Id=%s\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\nUnitFileState=enabled\\n' "$2" ;;
  is-enabled) echo enabled ;;
esac
exit 0
"""
FAKE_CLOUD_INIT = """#!/bin/sh
echo "cloud-init $*" >> "{log}"
echo "status: done"
"""


def test_waits_for_cloud_init_stops_the_unattended_units_present_and_quiets_needrestart(tmp_path):
    bin_dir, log, needrestart = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "needrestart"
    bin_dir.mkdir()
    (needrestart / "conf.d").mkdir(parents=True)
    for name, body in (("systemctl", FAKE_SYSTEMCTL), ("cloud-init", FAKE_CLOUD_INIT)):
        (bin_dir / name).write_text(body.format(log=log))
        (bin_dir / name).chmod(0o755)
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role: {name: common, tasks_from: apt}\n"
    )
    venv_bin = Path(sys.executable).parent
    result = subprocess.run(
        [venv_bin / "ansible-playbook", "-i", "localhost,", str(play)]
        + ["-e", json.dumps({"common_needrestart_dir": str(needrestart)})],
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
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert calls[0] == "cloud-init status --wait", "cloud-init first: it holds the dpkg lock too"
    # Only the unit that exists is touched: stopped and disabled.
    touched = [c for c in calls if c.split()[1] in ("stop", "disable")]
    assert sorted(touched) == ["systemctl disable apt-daily.timer", "systemctl stop apt-daily.timer"]
    conf = (needrestart / "conf.d" / "50-trainrig.conf").read_text()
    assert "$nrconf{restart} = 'a';" in conf and "$nrconf{kernelhints} = 0;" in conf
