"""ansible-lint's production profile over playbooks/, offline (settings in .ansible-lint)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ansible_lint_production_profile():
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [bin_dir / "ansible-lint", "--nocolor", "playbooks/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
