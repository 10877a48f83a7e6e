"""With the real Pulumi CLI: the program previews from a local file backend. Skipped where the CLI is absent."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.infra.conftest import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("pulumi") is None,
    reason="the Pulumi CLI is not installed (not on PyPI/npm/Debian; its installer needs the internet)",
)


def test_preview_of_the_aws_stack_with_a_local_backend(tmp_path):
    env = {
        **os.environ,
        "PULUMI_BACKEND_URL": f"file://{tmp_path}",
        "PULUMI_CONFIG_PASSPHRASE": "test",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SKIP_CREDENTIALS_VALIDATION": "true",
    }
    subprocess.run(["pulumi", "stack", "init", "aws-16-gpu"], cwd=ROOT, env=env, check=True, timeout=120)
    result = subprocess.run(
        ["pulumi", "preview", "--stack", "aws-16-gpu", "--non-interactive"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "trainrig:index:GpuCluster" in result.stdout, result.stdout + result.stderr
