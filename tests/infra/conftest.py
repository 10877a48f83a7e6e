"""Pulumi's own mocks for the program's tests: every registered resource is recorded with its options."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pytest
from pulumi.runtime.mocks import MockMonitor

from infra import keys

ROOT = Path(__file__).resolve().parents[2]
STACKS = sorted((ROOT / "stacks").glob("Pulumi.*.yaml"))


# Which zones of us-east-1 offer which instance types, as the mocked provider answers
# DescribeInstanceTypeOfferings: us-east-1a lacks p3.16xlarge, so a fixed first zone would not do.
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d")
OFFERINGS = {"p3.16xlarge": ("us-east-1b", "us-east-1c"), "g5.12xlarge": ("us-east-1c", "us-east-1d")}


@dataclass
class Registered:
    type: str
    name: str
    inputs: dict
    protect: bool
    parent: str
    ignore_changes: list = field(default_factory=list)


@dataclass
class CloudMocks(pulumi.runtime.Mocks):
    """Answers like a cloud would: ids, addresses inside the cluster's network, a host key per HostKey."""

    private_prefix: str = "10.42.0."
    resources: list[Registered] = field(default_factory=list)
    invokes: list = field(default_factory=list)
    counter: itertools.count = field(default_factory=lambda: itertools.count(10))

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        n = next(self.counter)
        state = dict(args.inputs)
        if args.typ == "aws:ec2/instance:Instance":
            state.update(
                publicIp=f"203.0.113.{n}",
                privateIp=f"{self.private_prefix}{n}",
                availabilityZone="us-east-1a",
                ebsBlockDevices=[{**d, "volumeId": f"vol-0{n:016x}"} for d in args.inputs.get("ebsBlockDevices", [])],
            )
        elif args.typ == "aws:efs/mountTarget:MountTarget":
            state.update(ipAddress=f"{self.private_prefix}{n}")
        elif args.typ == "aws:ec2/placementGroup:PlacementGroup":
            state.setdefault("name", args.name)
        elif args.typ.endswith("trainrig:HostKey"):
            state.update(public_key=keys.bare(keys.generate().public_openssh), private_key="PRIVATE")
        elif args.typ.endswith("ibm:VirtualServer"):
            state.update(public_ip=f"169.45.0.{n}", private_ip=f"10.45.19.{n}", guest_id=n)
        elif args.typ.endswith("local:Cluster"):
            state.update(
                inventory={
                    "cluster": args.inputs["cluster"],
                    "cloud": "local",
                    "ssh_user": "root",
                    "ssh_private_key": "/tmp/id_ed25519",
                    "nodes": [],
                }
            )
        elif args.typ.endswith("ibm:SshKey"):
            state.update(key_id=n)
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        self.invokes.append((args.token, args.args))
        if args.token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            types = args.args["filters"][0]["values"]
            pairs = [(t, z) for t in types for z in OFFERINGS.get(t, ZONES)]
            return {"instanceTypes": [t for t, _ in pairs], "locations": [z for _, z in pairs]}
        if args.token == "aws:ec2/getAmi:getAmi":
            owner = args.args["owners"][0]
            return {"id": "ami-0dlami" if owner == "amazon" else "ami-0ubuntu"}
        answers = {
            "aws:ec2/getVpc:getVpc": {"id": "vpc-default", "cidrBlock": "10.42.0.0/16"},
            "aws:ec2/getSubnets:getSubnets": {"ids": ["subnet-b", "subnet-a"]},
        }
        return answers.get(args.token, {})

    def of_type(self, suffix: str) -> list[Registered]:
        return [r for r in self.resources if r.type.endswith(suffix)]


class RecordingMonitor(MockMonitor):
    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            self.mocks.resources.append(
                Registered(
                    request.type,
                    request.name,
                    self.resources[response.urn].state,
                    bool(request.protect),
                    request.parent,
                    list(request.ignoreChanges),
                )
            )
        return response


@pytest.fixture
def mocks():
    m = CloudMocks()
    pulumi.runtime.set_mocks(m, project="trainrig", stack="test", preview=False, monitor=RecordingMonitor(m))
    yield m
