"""The Pulumi program under Pulumi's mocks: for every sample stack, the resources, rules, protection and outputs."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address

import pulumi
import pytest
import yaml

from infra import config
from infra.component import GpuCluster, GpuClusterArgs
from infra.inventory import Inventory
from tests.infra.conftest import STACKS

CLOUD_STACKS = [p for p in STACKS if "local" not in p.name]


def build(path, **overrides):
    cfg = config.load_stack_file(path)
    if overrides:
        cfg = type(cfg).model_validate({**cfg.model_dump(exclude_unset=True), **overrides})
    return cfg, GpuCluster(cfg.cluster, GpuClusterArgs(cfg))


def outputs(cluster: GpuCluster):
    return pulumi.Output.all(cluster.inventory, cluster.hourly_cost_usd)


@pytest.mark.parametrize("path", CLOUD_STACKS, ids=lambda p: p.stem)
def test_outputs_are_an_inventory_and_a_price(mocks, path):
    cfg, cluster = build(path)

    @pulumi.runtime.test
    def check():
        def verify(values):
            inventory, cost = values
            inv = Inventory.model_validate_json(json.dumps(inventory))
            assert [n.name for n in inv.gpu_nodes] == cfg.gpu_node_names()
            assert all(n.gpu_count == cfg.gpus for n in inv.gpu_nodes)
            assert all(n.data_disks[0].size_gb == cfg.data_disk_gb for n in inv.gpu_nodes)
            assert inv.storage.mount_point == "/data"
            assert inv.ssh_user == "root", "runs are system units: the key pair logs in as root"
            if cfg.cloud == "aws":
                # A path that names the EBS volume itself: NVMe numbering follows discovery order.
                want = (
                    r"^/dev/xvdf$"
                    if cfg.flavor.startswith(("p2.", "p3."))
                    else r"^/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0[0-9a-f]{16}$"
                )
                assert all(re.match(want, n.data_disks[0].device) for n in inv.gpu_nodes), inv.gpu_nodes[0].data_disks
            if cfg.cloud == "ibm":
                # What the dead-man switch cancels and what `fab up` restores after `fab park`.
                assert all(n.cloud_id and n.cloud_id.isdigit() and n.flavor == cfg.flavor for n in inv.gpu_nodes)
                park = cfg.prices.machine_usd_per_hour(cfg.park_machine)
                disk = cfg.prices.disk_usd_per_hour(cfg.data_disk_gb)
                assert inv.gpu_nodes[0].parked_hourly_price_usd == pytest.approx(park + disk, abs=1e-4)
            if cfg.shared_fs:
                # Mounted from the mount target's address, inside the cluster's network; no server.
                assert inv.storage.kind == "efs" and inv.storage_node is None and inv.storage.export == "/"
                assert IPv4Address(inv.storage.server) in inv.network.cidr
                storage_node_price = 0.0
            else:
                assert inv.storage_node is not None and inv.storage.export == "/data"
                assert inv.storage_node.data_disks[0].size_gb == cfg.storage_disk_gb
                storage_node_price = inv.storage_node.hourly_price_usd
            assert cost["total"] == pytest.approx(cost["compute"] + cost["storage"], abs=1e-3)
            assert cost["compute"] == pytest.approx(round(inv.hourly_cost_usd() - storage_node_price, 4), abs=1e-3)
            assert cost["storage"] > 0

        return outputs(cluster).apply(verify)

    check()
    # Every resource is a child of the component (directly or through the provider), named after it.
    component = mocks.of_type("GpuCluster")[0]
    assert all(r.name.startswith(f"{cfg.cluster}-") for r in mocks.resources if r is not component)


@pytest.mark.parametrize("path", [p for p in CLOUD_STACKS if "aws" in p.name], ids=lambda p: p.stem)
def test_aws_graph(mocks, path):
    cfg, cluster = build(path)
    pulumi.runtime.test(lambda: outputs(cluster))()
    instances = mocks.of_type("aws:ec2/instance:Instance")
    gpu = [i for i in instances if i.inputs["tags"]["trainrig:role"] == "gpu"]
    storage = [i for i in instances if i.inputs["tags"]["trainrig:role"] == "storage"]
    assert len(gpu) == cfg.gpu_nodes and {i.inputs["instanceType"] for i in gpu} == {cfg.flavor}
    assert all(i.inputs["ebsBlockDevices"][0]["volumeSize"] == cfg.data_disk_gb for i in gpu)
    # The image by instance family: the OSS-driver Deep Learning AMI cannot drive P3's V100s.
    want_ami = "ami-0ubuntu" if cfg.flavor.startswith("p3") else "ami-0dlami"
    assert all(i.inputs["ami"] == want_ami for i in gpu)
    assert all(i.inputs["placementGroup"] for i in gpu)
    for instance in instances:
        # A newer image never replaces an instance; IMDSv2 only, one hop (no container reaches it).
        assert "ami" in instance.ignore_changes, instance.name
        assert instance.inputs["metadataOptions"] == {
            "httpEndpoint": "enabled",
            "httpTokens": "required",
            "httpPutResponseHopLimit": 1,
        }
    for attachment in mocks.of_type("aws:ec2/volumeAttachment:VolumeAttachment"):
        assert attachment.inputs["stopInstanceBeforeDetaching"] is True, "a busy NFS volume never detaches"
    assert all(("instanceMarketOptions" in i.inputs) == cfg.spot for i in gpu)
    # A GPU node that powers itself off (the dead-man switch) is terminated; the storage node only stops.
    assert all(i.inputs["instanceInitiatedShutdownBehavior"] == "terminate" for i in gpu)
    assert all("instanceInitiatedShutdownBehavior" not in i.inputs for i in storage)
    for instance in instances:  # the host key pinned before first boot; the key pair logs in as root
        secret = instance.inputs["userData"]  # it holds the private host key: a secret in state
        assert isinstance(secret, dict) and "value" in secret, "user data must be a Pulumi secret"
        user_data = yaml.safe_load(secret["value"])
        assert user_data["disable_root"] is False and user_data["ssh_keys"]["ed25519_public"].startswith("ssh-ed25519 ")
        assert user_data["ssh_pwauth"] is False, "keys only: sshd without password logins"
    file_systems = mocks.of_type("aws:efs/fileSystem:FileSystem")
    if cfg.shared_fs:
        assert not storage and not mocks.of_type("aws:ebs/volume:Volume")
        assert len(file_systems) == 1 and file_systems[0].inputs["encrypted"] is True
        targets = mocks.of_type("aws:efs/mountTarget:MountTarget")
        assert [t.inputs["fileSystemId"] for t in targets] == [f"{file_systems[0].name}-id"]
    else:
        assert not file_systems
        assert len(storage) == 1 and storage[0].inputs["instanceType"] == cfg.storage_flavor
        assert [v.inputs["size"] for v in mocks.of_type("aws:ebs/volume:Volume")] == [cfg.storage_disk_gb]
    assert len(mocks.of_type("aws:ec2/placementGroup:PlacementGroup")) == 1
    assert mocks.of_type("aws:ec2/placementGroup:PlacementGroup")[0].inputs["strategy"] == "cluster"
    assert len(mocks.of_type("aws:ec2/keyPair:KeyPair")) == 1
    if cfg.vpc == "new":
        assert len(mocks.of_type("aws:ec2/vpc:Vpc")) == 1 and len(mocks.of_type("aws:ec2/subnet:Subnet")) == 1
    # The zone: the first that offers every instance type the stack runs (us-east-1a has no p3).
    wanted = {"p3.16xlarge": "us-east-1b", "g5.12xlarge": "us-east-1c"}[cfg.flavor]
    if cfg.vpc == "new":
        assert mocks.of_type("aws:ec2/subnet:Subnet")[0].inputs["availabilityZone"] == wanted
    else:
        filters = next(a for t, a in mocks.invokes if t == "aws:ec2/getSubnets:getSubnets")["filters"]
        assert {"name": "availability-zone", "values": [wanted]} in filters


def test_aws_on_idle_park_makes_gpu_nodes_that_stop_and_says_so_in_the_inventory(mocks):
    """trainrig:on_idle: park: a GPU node that powers itself off stops (disks kept) rather than ending."""
    path = next(p for p in CLOUD_STACKS if p.stem == "Pulumi.aws-16-gpu")
    cfg, cluster = build(path, on_idle="park", gpu_nodes=2)

    seen = []

    @pulumi.runtime.test
    def check():
        return cluster.inventory.apply(lambda inv: seen.append(Inventory.model_validate_json(json.dumps(inv)).on_idle))

    check()
    assert seen == ["park"]  # recorded in the inventory: the switch is armed with it
    instances = mocks.of_type("aws:ec2/instance:Instance")
    gpu = [i for i in instances if i.inputs["tags"]["trainrig:role"] == "gpu"]
    assert len(gpu) == 2
    assert all(i.inputs["instanceInitiatedShutdownBehavior"] == "stop" for i in gpu)


@pytest.mark.parametrize("path", [p for p in CLOUD_STACKS if "aws" in p.name], ids=lambda p: p.stem)
@pytest.mark.parametrize("nodes", [1, 2])
def test_aws_placement_group_does_not_depend_on_the_node_count(mocks, path, nodes):
    """1 -> 2 nodes must not add a group to node0 (a new node0 and a lost data disk)."""
    cfg, cluster = build(path, gpu_nodes=nodes)
    pulumi.runtime.test(lambda: outputs(cluster))()
    assert len(mocks.of_type("aws:ec2/placementGroup:PlacementGroup")) == 1
    node0 = next(i for i in mocks.of_type("aws:ec2/instance:Instance") if i.name.endswith("-node0"))
    assert node0.inputs["placementGroup"]


def test_aws_a_zone_that_does_not_offer_the_type_is_refused(mocks):
    path = next(p for p in CLOUD_STACKS if "aws-16" in p.name)
    cfg, cluster = build(path, zone="us-east-1a")
    with pytest.raises(Exception, match=r"zone us-east-1a does not offer p3.16xlarge"):
        pulumi.runtime.test(lambda: outputs(cluster))()


@pytest.mark.parametrize("path", [p for p in CLOUD_STACKS if "aws" in p.name], ids=lambda p: p.stem)
def test_aws_only_ssh_from_admin_reaches_in(mocks, path):
    cfg, cluster = build(path)
    pulumi.runtime.test(lambda: outputs(cluster))()
    groups = mocks.of_type("aws:ec2/securityGroup:SecurityGroup")
    assert len(groups) == 1 and not groups[0].inputs.get("ingress"), "no inline rules"
    group_id = f"{groups[0].name}-id"
    ingress = mocks.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
    from_outside = [r.inputs for r in ingress if "referencedSecurityGroupId" not in r.inputs]
    assert from_outside == [
        {**from_outside[0], "ipProtocol": "tcp", "fromPort": 22, "toPort": 22, "cidrIpv4": str(cfg.admin_cidr)}
    ]
    inside = [r.inputs for r in ingress if "referencedSecurityGroupId" in r.inputs]
    assert inside and all(r["referencedSecurityGroupId"] == group_id for r in inside), "NFS and MPI only from members"
    for instance in mocks.of_type("aws:ec2/instance:Instance"):
        assert instance.inputs["vpcSecurityGroupIds"] == [group_id]
    for target in mocks.of_type("aws:efs/mountTarget:MountTarget"):
        assert target.inputs["securityGroups"] == [group_id], "EFS's NFS only from cluster members"


@pytest.mark.parametrize("path", [p for p in CLOUD_STACKS if "ibm" in p.name], ids=lambda p: p.stem)
def test_ibm_graph(mocks, path):
    cfg, cluster = build(path)
    pulumi.runtime.test(lambda: outputs(cluster))()
    servers = mocks.of_type("ibm:VirtualServer")
    gpu = [s for s in servers if s.inputs["hostname"].startswith("node")]
    storage = [s for s in servers if s.inputs["hostname"] == "storage"]
    assert len(gpu) == cfg.gpu_nodes and {s.inputs["flavor"] for s in gpu} == {cfg.flavor}
    assert storage[0].inputs["flavor"] == cfg.storage_flavor
    # Data disks only: the flavor brings the boot disk (a device 0 would contradict it).
    assert all(s.inputs["disks"] == [cfg.data_disk_gb] for s in gpu)
    assert storage[0].inputs["disks"] == [cfg.storage_disk_gb]
    for s in servers:
        assert s.inputs["datacenter"] == cfg.datacenter and s.inputs["hourly"] is True
        assert s.inputs["local_disk"] is False, "SAN disks, as the seeds ordered"
        assert s.inputs["nic_speed"] == 1000 and s.inputs["os_code"] == cfg.image
        assert f"trainrig-cluster:{cfg.cluster}" in s.inputs["tags"]
        user_data = yaml.safe_load(s.inputs["user_data"]["value"])
        assert user_data["ssh_pwauth"] is False, "keys only: sshd without password logins"
        # Only SSH from the operator at first boot; provisioning lets in the cluster's own nodes by
        # address. Never the whole private network, which every server of the account shares.
        assert user_data["runcmd"] == [
            ["ufw", "default", "deny", "incoming"],
            [
                "ufw",
                "allow",
                "from",
                str(cfg.admin_cidr),
                "to",
                "any",
                "port",
                "22",
                "proto",
                "tcp",
                "comment",
                "trainrig-admin",
            ],
            ["ufw", "--force", "enable"],
        ]
    assert len(mocks.of_type("ibm:SshKey")) == 1


@pytest.mark.parametrize("path", CLOUD_STACKS, ids=lambda p: p.stem)
def test_storage_is_protected_and_compute_is_not(mocks, path):
    cfg, cluster = build(path)
    pulumi.runtime.test(lambda: outputs(cluster))()
    storage = [r for r in mocks.resources if "storage" in r.name or "-efs" in r.name]
    assert storage and all(r.protect for r in storage), [r.name for r in storage if not r.protect]
    compute = [r for r in mocks.resources if "-node" in r.name]
    assert compute and not any(r.protect for r in compute)


@pytest.mark.parametrize("path", CLOUD_STACKS, ids=lambda p: p.stem)
def test_zero_gpu_nodes_keeps_storage(mocks, path):
    cfg, cluster = build(path, gpu_nodes=0)

    @pulumi.runtime.test
    def check():
        def verify(inventory):
            inv = Inventory.model_validate_json(json.dumps(inventory))
            assert [n.name for n in inv.nodes] == ([] if cfg.shared_fs else ["storage"])
            assert inv.storage is not None

        return cluster.inventory.apply(verify)

    check()
    assert not [r for r in mocks.resources if "-node" in r.name]
    assert [r for r in mocks.resources if ("storage" in r.name or "-efs" in r.name) and r.protect]


@pytest.mark.parametrize("path", [p for p in CLOUD_STACKS if p.stem in ("Pulumi.aws-16-gpu", "Pulumi.ibm-dal10-v100")])
def test_baked_images_start_the_nodes_of_their_own_role(mocks, path):
    aws = "aws" in path.stem
    gpu_image, storage_image = ("ami-0baked0gpu", "ami-0baked0storage") if aws else ("1911", "1912")
    cfg, cluster = build(path, image=gpu_image, storage_image=storage_image)
    pulumi.runtime.test(lambda: outputs(cluster))()
    if aws:
        by_role = {
            i.inputs["tags"]["trainrig:role"]: i.inputs["ami"] for i in mocks.of_type("aws:ec2/instance:Instance")
        }
    else:
        by_role = {
            "storage" if s.inputs["hostname"] == "storage" else "gpu": s.inputs.get("image_id")
            for s in mocks.of_type("ibm:VirtualServer")
        }
    assert by_role == {"gpu": gpu_image, "storage": storage_image}


def test_an_ibm_gpu_nodes_baked_image_never_starts_the_storage_node(mocks):
    path = next(p for p in CLOUD_STACKS if p.stem == "Pulumi.ibm-dal10-v100")
    cfg, cluster = build(path, image="1911")
    pulumi.runtime.test(lambda: outputs(cluster))()
    (storage,) = [s for s in mocks.of_type("ibm:VirtualServer") if s.inputs["hostname"] == "storage"]
    assert storage.inputs.get("image_id") is None and storage.inputs["os_code"] == "UBUNTU_22_64"
