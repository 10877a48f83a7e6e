"""`fab plan`: the table of what a stack will create and its $/hour, and one-line errors, with no Pulumi CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.infra.conftest import ROOT

FAB = os.path.join(os.path.dirname(sys.executable), "fab")
CREDENTIALS = {"SL_USERNAME": "u", "SL_API_KEY": "k", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}


def fab(*args, env, tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SL_", "AWS_"))}
    return subprocess.run(
        [FAB, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "HOME": str(tmp_path), "TRAINRIG_HOME": str(tmp_path), "COLUMNS": "160", **env},
    )


def test_plan_prints_nodes_flavors_disks_and_price(tmp_path):
    result = fab("plan", "--stack", "ibm-syd04-dual-v100", env=CREDENTIALS, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("AC2_16X120X100") == 2 and "2 x Tesla V100" in out and "2000 GB" in out
    assert "total" in out and "10.621" in out and "prices as of" in out


def test_plan_with_efs_prices_storage_per_gb_and_lists_no_storage_node(tmp_path):
    result = fab("plan", "--stack", "aws-4-gpu-efs", env=CREDENTIALS, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [r[0] for r in rows if r and r[0].startswith("node") and r[1] == "gpu"] == [
        "node0",
        "node1",
        "node2",
        "node3",
    ]
    assert not [r for r in rows if len(r) > 1 and r[1] == "storage" and r[0] != "efs"]
    efs = next(r for r in rows if r and r[0] == "efs")
    assert efs[-3:-1] == ["500", "GB"] and float(efs[-1]) == pytest.approx(500 * 0.30 / 730, abs=1e-3)
    assert "EFS is billed per GB stored" in result.stdout


@pytest.mark.parametrize(
    "args, env, error",
    [
        (["plan"], CREDENTIALS, "error: no stack selected; pass --stack NAME"),
        (["plan", "--stack", "nope"], CREDENTIALS, "error: stack file"),
        (["plan", "--stack", "aws-16-gpu"], {}, "error: AWS_ACCESS_KEY_ID: AWS credentials are missing"),
        (
            ["plan", "--stack", "tests/infra/cases/stack_bad_cloud.yaml"],
            CREDENTIALS,
            "error: trainrig:cloud: unknown cloud 'gcp'",
        ),
    ],
)
def test_plan_bad_input_is_one_line_without_traceback(tmp_path, args, env, error):
    result = fab(*args, env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(error), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_plan_names_the_image_each_family_starts_from(tmp_path):
    p3 = fab("plan", "--stack", "aws-16-gpu", env={**CREDENTIALS, "COLUMNS": "400"}, tmp_path=tmp_path)
    assert p3.returncode == 0, p3.stderr
    assert "GPU node image: newest 'ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*'" in p3.stdout
    g5 = fab("plan", "--stack", "aws-4-gpu-efs", env={**CREDENTIALS, "COLUMNS": "400"}, tmp_path=tmp_path)
    assert "GPU node image: newest 'Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *'" in g5.stdout
