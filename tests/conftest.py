"""Fixtures every test folder may use: an AWS API on loopback (moto's server), and a stand-in Pulumi CLI."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's server on 127.0.0.1, shared by the session (each test resets it through `aws`)."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    """boto3 pointed at moto with fake credentials, starting from an empty account; yields the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # boto3 sends every call to moto on loopback
    # moto keeps one in-process account for every server: start each test from an empty one.
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=10)
    return moto_endpoint


class FakePulumi:
    """A stand-in `pulumi` CLI on PATH (the real one is not installable here) for the automation API to drive.

    It answers what pulumi.automation asks of the CLI: its version, stack selection, outputs and
    config as JSON, config changes, and up/destroy/unprotect, logging every call. A command named
    in `fail` exits 1 with an error line, as the CLI does.
    """

    def __init__(self, root: Path, outputs: dict, config: dict[str, str]):
        self.root = root
        self.set(outputs=outputs, config=config)
        self.fail: set[str] = set()

    def set(self, outputs: dict | None = None, config: dict[str, str] | None = None) -> None:
        if outputs is not None:
            (self.root / "outputs.json").write_text(json.dumps(outputs))
        if config is not None:
            (self.root / "config.json").write_text(
                json.dumps({k: {"value": v, "secret": False} for k, v in config.items()})
            )

    def calls(self) -> list[list[str]]:
        log = self.root / "calls"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def verbs(self) -> list[str]:
        """Each call as 'verb subverb' without flags, e.g. 'config set', 'up', 'state unprotect'."""
        return [
            " ".join(a for a in call[:2] if not a.startswith("-")) for call in self.calls() if call[:1] != ["version"]
        ]

    SCRIPT = """#!{python}
import json, pathlib, sys
root = pathlib.Path({root!r})
args = [a for a in sys.argv[1:] if a != "--non-interactive"]
with open(root / "calls", "a") as log:
    log.write(json.dumps(args) + "\\n")
verb = " ".join(a for a in args[:2] if not a.startswith("-"))
if verb in json.loads((root / "fail.json").read_text() if (root / "fail.json").exists() else "[]"):
    sys.stderr.write(f"error: {{verb}} refused by the stand-in cloud\\n")
    sys.exit(1)
if args[:1] == ["version"]:
    print("v3.210.0")
elif verb == "stack output":
    print((root / "outputs.json").read_text())
elif verb == "stack history":
    print(json.dumps([{{"kind": "update", "startTime": "2026-01-01T00:00:00.000Z", "message": "", "environment": {{}},
                       "config": {{}}, "result": "succeeded", "endTime": "2026-01-01T00:00:01.000Z"}}]))
elif verb == "config set":
    config = json.loads((root / "config.json").read_text())
    key = next(a for a in args[2:] if not a.startswith("-"))
    config[key] = {{"value": args[-1], "secret": False}}
    (root / "config.json").write_text(json.dumps(config))
elif args[:1] == ["config"] and "--json" in args:
    print((root / "config.json").read_text())
"""

    def install(self, bin_dir: Path) -> None:
        script = bin_dir / "pulumi"
        script.write_text(self.SCRIPT.format(python=sys.executable, root=str(self.root)))
        script.chmod(0o755)

    def failing(self, *verbs: str) -> None:
        (self.root / "fail.json").write_text(json.dumps(list(verbs)))


@pytest.fixture
def fake_pulumi(tmp_path, monkeypatch):
    """Returns a factory: fake_pulumi(outputs, config) puts a stand-in pulumi first on PATH."""

    def make(outputs: dict, config: dict[str, str]) -> FakePulumi:
        root = tmp_path / "fake-pulumi"
        (root / "bin").mkdir(parents=True, exist_ok=True)
        fake = FakePulumi(root, outputs, config)
        fake.install(root / "bin")
        monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
        return fake

    return make


@pytest.fixture
def ssh_cluster(tmp_path, monkeypatch):
    """Returns a factory: ssh_cluster(gpu_nodes) starts in-process sshds (tests/sshd.py), one per node.

    TRAINRIG_HOME is a fresh folder, so run records and cluster state stay in the test's tmp_path.
    """
    from tests.sshd import SshCluster, start_cluster

    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
    started: list[SshCluster] = []

    def make(gpu_nodes: int = 2) -> SshCluster:
        cluster = start_cluster(tmp_path / f"cluster{len(started)}", gpu_nodes)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        for server in cluster.servers.values():
            server.stop()
