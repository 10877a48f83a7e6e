"""`fab plan --verify` for AWS: ask EC2 whether the stack's instances would launch, without launching any.

Checked, each as one line when it fails: the image (exists, x86_64), the zone (one that offers
every instance type), RunInstances with DryRun per instance type (permissions, image and type
together), and the Service Quotas for running instances of each family against the vCPUs the
stack needs. Notes (not failures): a newer image than the one running nodes were made from.
What no API answers before the order: whether capacity is there at that moment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from infra.blueprint import Blueprint
from infra.clouds import Findings
from infra.clouds.aws import AwsConfig, images

# Service Quotas codes of the EC2 running-instances quotas, counted in vCPUs, by instance class
# (the letters an instance family starts with). Service Quotas console, service "Amazon EC2".
ON_DEMAND_QUOTAS = {
    "P": ("L-417A185B", "Running On-Demand P instances"),
    "G": ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    "standard": ("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
}
SPOT_QUOTAS = {
    "P": ("L-7212CCBC", "All P Spot Instance Requests"),
    "G": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    "standard": ("L-34B43A08", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests"),
}


def quota_class(instance_type: str) -> str:
    letter = instance_type[0].upper()
    return letter if letter in ("P", "G") else "standard"


def verify(cfg: AwsConfig, bp: Blueprint, session: Any = None, endpoint_url: str | None = None) -> Findings:
    import boto3

    session = session or boto3.session.Session()
    ec2 = session.client("ec2", region_name=cfg.region, endpoint_url=endpoint_url)
    quotas = session.client("service-quotas", region_name=cfg.region, endpoint_url=endpoint_url)
    found = Findings()
    gpu_image = _image(ec2, cfg.image, images.image_for(cfg.flavor, cfg.gpus), "GPU nodes", found)
    storage_image = None
    if not cfg.shared_fs:
        storage_image = _image(ec2, cfg.storage_image, images.UBUNTU, "the storage node", found)
    zone = _zone(ec2, cfg, found)
    launches = [(cfg.flavor, gpu_image)] + ([(cfg.storage_flavor, storage_image)] if storage_image else [])
    for instance_type, image in launches:
        if image is not None and zone is not None:
            _dry_run(ec2, instance_type, image, zone, cfg.spot and instance_type == cfg.flavor, found)
    _quotas(quotas, cfg, bp, found)
    _newer_images(ec2, cfg, gpu_image, storage_image, found)
    return found


def _client_error(exc: Exception) -> tuple[str, str]:
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {})
    return error.get("Code", type(exc).__name__), error.get("Message", str(exc)).splitlines()[0]


def _image(ec2, image_id: str | None, choice: images.ImageChoice, who: str, found: Findings) -> dict | None:
    """The image `who` would start from now: trainrig:image, or the newest of its family's kind."""
    from botocore.exceptions import ClientError

    try:
        if image_id:
            listed = ec2.describe_images(ImageIds=[image_id])["Images"]
        else:
            listed = ec2.describe_images(
                Owners=[choice.owner],
                Filters=[
                    {"Name": "name", "Values": [choice.name]},
                    {"Name": "architecture", "Values": [choice.arch]},
                ],
            )["Images"]
    except ClientError as exc:
        code, message = _client_error(exc)
        found.problems.append(f"image for {who}: {image_id or choice.name} cannot be looked up: {message} ({code})")
        return None
    if not listed:
        what = image_id or f"no image named {choice.name!r} owned by {choice.owner}"
        found.problems.append(f"image for {who}: {what} does not exist in {ec2.meta.region_name}")
        return None
    image = max(listed, key=lambda i: i.get("CreationDate", ""))
    if image.get("Architecture") != "x86_64":
        found.problems.append(
            f"image for {who}: {image['ImageId']} is {image.get('Architecture')}, the instance types are x86_64"
        )
        return None
    return image


def offered_zones(ec2, types: Iterable[str]) -> dict[str, set[str]]:
    """instance type -> the availability zones of the client's region that offer it."""
    types = sorted(set(types))
    offered: dict[str, set[str]] = {t: set() for t in types}
    pages = ec2.get_paginator("describe_instance_type_offerings").paginate(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": types}]
    )
    for page in pages:
        for offering in page["InstanceTypeOfferings"]:
            offered.setdefault(offering["InstanceType"], set()).add(offering["Location"])
    return offered


def _zone(ec2, cfg: AwsConfig, found: Findings) -> str | None:
    types = [cfg.flavor] + ([cfg.storage_flavor] if cfg.storage_flavor and not cfg.shared_fs else [])
    offered = offered_zones(ec2, types)
    zone = images.choose_zone(offered, set().union(*offered.values()), cfg.zone)
    if zone is None:
        found.problems.append(images.zone_problem(offered, cfg.zone, cfg.region))
    return zone


def _dry_run(ec2, instance_type: str, image: dict, zone: str, spot: bool, found: Findings) -> None:
    from botocore.exceptions import ClientError

    args: dict[str, Any] = {
        "DryRun": True,
        "ImageId": image["ImageId"],
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "Placement": {"AvailabilityZone": zone},
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
    }
    if spot:
        args["InstanceMarketOptions"] = {"MarketType": "spot"}
    try:
        ec2.run_instances(**args)
    except ClientError as exc:
        code, message = _client_error(exc)
        if code == "DryRunOperation":
            return  # "Request would have succeeded, but DryRun flag is set."
        found.problems.append(f"{instance_type} in {zone}: EC2 would refuse the launch: {message} ({code})")


def _quotas(quotas, cfg: AwsConfig, bp: Blueprint, found: Findings) -> None:
    """vCPUs the stack runs per quota, against the account's quota (running instances count too)."""
    from botocore.exceptions import ClientError

    needed: dict[tuple[str, str], int] = {}
    for node in bp.nodes:
        spot = cfg.spot and node.role == "gpu"
        table = SPOT_QUOTAS if spot else ON_DEMAND_QUOTAS
        key = table[quota_class(node.flavor)]
        needed[key] = needed.get(key, 0) + node.cpus
    for (code, name), vcpus in sorted(needed.items()):
        try:
            value = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
        except ClientError as exc:
            err, message = _client_error(exc)
            found.notes.append(f"quota {name!r} ({code}) could not be read: {message} ({err})")
            continue
        if value < vcpus:
            found.problems.append(
                f"quota {name!r} is {value:,.0f} vCPUs in {cfg.region}, the stack needs {vcpus:,}: "
                f"ask for more in Service Quotas (ec2, {code}) before pulumi up"
            )


def _newer_images(ec2, cfg: AwsConfig, gpu_image: dict | None, storage_image: dict | None, found: Findings) -> None:
    """Nodes keep the image they were made from; say when a newer one of their kind exists."""
    newest = {"gpu": gpu_image, "storage": storage_image}
    tag = [{"Name": "tag:trainrig:cluster", "Values": [cfg.cluster]}]
    for reservation in ec2.describe_instances(Filters=tag)["Reservations"]:
        for inst in reservation["Instances"]:
            if inst["State"]["Name"] in ("terminated", "shutting-down"):
                continue
            tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            latest = newest.get(tags.get("trainrig:role", ""))
            if (
                latest
                and latest["ImageId"] != inst["ImageId"]
                and not (cfg.image and tags.get("trainrig:role") == "gpu")
            ):
                found.notes.append(
                    f"{tags.get('Name', inst['InstanceId'])} runs {inst['ImageId']}; a newer image exists: "
                    f"{latest['ImageId']} ({latest.get('Name', '')}, {latest.get('CreationDate', '')[:10]}). "
                    "Running nodes keep theirs; nodes added now start from the newer one"
                )
