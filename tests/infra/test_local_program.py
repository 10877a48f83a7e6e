"""cloud: local through the Pulumi program: a dynamic provider over the local backend (a stand-in backend here; the
real one is exercised end to end by tests/integration)."""

from __future__ import annotations

import dill
import pulumi
import pytest

from infra import config
from infra.clouds.local import program as local_program
from infra.component import GpuCluster, GpuClusterArgs
from infra.inventory import Inventory
from tests.infra.conftest import ROOT

INV = Inventory(cluster="dev", cloud="local", ssh_user="root", ssh_private_key="/k", nodes=[])


class FakeBackend:
    def __init__(self, fail_ready=False):
        self.calls, self.fail_ready = [], fail_ready

    def create(self, request, board):
        self.calls.append(("create", request.gpu_nodes, request.data_disk_gb))
        return INV

    def wait_ready(self, inv, board):
        if self.fail_ready:
            raise RuntimeError("sshd never answered")

    def describe(self, cluster):
        return INV

    def destroy(self, inv, purge):
        self.calls.append(("destroy", purge))


@pytest.fixture
def backend(monkeypatch):
    fake = FakeBackend()
    monkeypatch.setattr(local_program, "BACKEND", fake)
    return fake


def test_create_and_delete_use_the_local_backend_and_keep_storage(backend):
    provider = local_program.LocalClusterProvider()
    result = provider.create({"cluster": "dev", "gpu_nodes": 2, "data_disk_gb": 2})
    assert result.id == "dev" and result.outs["inventory"]["cluster"] == "dev"
    provider.delete("dev", {})
    assert backend.calls == [("create", 2, 2), ("destroy", False)]
    assert provider.diff("dev", {"gpu_nodes": 2}, {"gpu_nodes": 3}).replaces == ["gpu_nodes"]


def test_a_node_never_ready_is_rolled_back(monkeypatch):
    fake = FakeBackend(fail_ready=True)
    monkeypatch.setattr(local_program, "BACKEND", fake)
    with pytest.raises(RuntimeError):
        local_program.LocalClusterProvider().create({"cluster": "dev", "gpu_nodes": 1, "data_disk_gb": 2})
    assert fake.calls[-1] == ("destroy", False)


def test_provider_survives_pulumis_pickling():
    assert isinstance(
        dill.loads(dill.dumps(local_program.LocalClusterProvider(), recurse=True)), local_program.LocalClusterProvider
    )


def test_local_stack_under_mocks(mocks):
    cfg = config.load_stack_file(config.stack_file("local", ROOT))
    cluster = GpuCluster(cfg.cluster, GpuClusterArgs(cfg))
    pulumi.runtime.test(lambda: cluster.hourly_cost_usd)()
    [resource] = mocks.of_type("local:Cluster")
    assert resource.inputs["gpu_nodes"] == 2 and resource.name == "dev-nodes"
