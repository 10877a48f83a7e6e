"""Role common on a fresh cloud image, run on the operator's machine (connection local) against
stand-in systemctl and cloud-init, with needrestart's directory in a temporary folder: nothing of
the machine itself is touched."""

from __future__ import annotations

from tests.playbooks.local_role import run_tasks

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
    log, needrestart = tmp_path / "calls.log", tmp_path / "needrestart"
    (needrestart / "conf.d").mkdir(parents=True)
    stand_ins = {"systemctl": FAKE_SYSTEMCTL.format(log=log), "cloud-init": FAKE_CLOUD_INIT.format(log=log)}
    run_tasks(tmp_path, "common", "apt", stand_ins, {"common_needrestart_dir": str(needrestart)})
    calls = log.read_text().splitlines()
    assert calls[0] == "cloud-init status --wait", "cloud-init first: it holds the dpkg lock too"
    # Only the unit that exists is touched: stopped and disabled.
    touched = [c for c in calls if c.split()[1] in ("stop", "disable")]
    assert sorted(touched) == ["systemctl disable apt-daily.timer", "systemctl stop apt-daily.timer"]
    conf = (needrestart / "conf.d" / "50-trainrig.conf").read_text()
    assert "$nrconf{restart} = 'a';" in conf and "$nrconf{kernelhints} = 0;" in conf
