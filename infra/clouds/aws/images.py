"""Which machine image drives which GPU instance family, and the zones that offer an instance type.

Pure data and choices, shared by the Pulumi program (which looks things up through the provider)
and `fab plan --verify` (which asks the EC2 API directly): both decide the same way.

Sources, read 2026-12:
- AWS Deep Learning AMI release notes, "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu
  22.04)": supported_ec2_instances G4dn, G5, G6, Gr6, G6e, G7e, P4d, P4de, P5, P5e, P5en, P6
  (docs.aws.amazon.com/dlami/latest/devguide/, release notes per version). It ships NVIDIA's
  open kernel modules, which need a Turing or newer GPU: no P2 (K80) and no P3 (V100).
- The proprietary-driver DLAMI that lists P3 and P3dn is Amazon Linux 2 only ("Deep Learning Base
  Proprietary Nvidia Driver AMI (Amazon Linux 2)"), which the roles do not support; P3 nodes start
  from Canonical's Ubuntu 22.04 and the nvidia_driver role installs NVIDIA's proprietary driver.
- Tesla K80 (Kepler, P2) is supported by NVIDIA's driver branch 470 and older only, which no
  current DLAMI carries and current CUDA and framework builds no longer target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageChoice:
    key: str
    owner: str
    name: str  # the AMI name pattern (DescribeImages filter)
    arch: str
    driver: str  # where the NVIDIA driver comes from, for `fab plan`

    def describe(self) -> str:
        return f"newest '{self.name}' at the first pulumi up, then kept (driver {self.driver})"


CANONICAL = "099720109477"
DLAMI = ImageChoice(
    key="dlami",
    owner="amazon",
    name="Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *",
    arch="x86_64",
    driver="preinstalled, kept by the nvidia_driver role",
)
UBUNTU = ImageChoice(
    key="ubuntu",
    owner=CANONICAL,
    name="ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*",
    arch="x86_64",
    driver="installed by the nvidia_driver role",
)

# GPU instance family -> its image. A GPU family missing here has no image known to drive it.
FAMILY_IMAGES: Mapping[str, ImageChoice] = {
    **{f: DLAMI for f in ("g4dn", "g5", "g6", "gr6", "g6e", "p4d", "p4de", "p5", "p5e", "p5en")},
    **{f: UBUNTU for f in ("p3", "p3dn")},
}
# Families refused outright, with what to use instead.
REFUSED: Mapping[str, str] = {
    "p2": (
        "its Tesla K80 GPUs need NVIDIA driver 470 or older, which no current Deep Learning AMI or "
        "CUDA build supports; use p3 (V100), g4dn (T4) or g5 (A10G) instead"
    ),
}


def family(instance_type: str) -> str:
    return instance_type.split(".")[0]


def refusal(instance_type: str, gpus: int) -> str | None:
    """Why no supported image can drive this instance type's GPUs, or None when one can."""
    fam = family(instance_type)
    if fam in REFUSED:
        return f"{instance_type}: {REFUSED[fam]}"
    if gpus and fam not in FAMILY_IMAGES:
        supported = ", ".join(sorted(FAMILY_IMAGES))
        return f"{instance_type}: no supported image is known to drive its GPUs; use one of the families {supported}"
    return None


def image_for(instance_type: str, gpus: int) -> ImageChoice:
    """The image a node of this type starts from: its family's for GPU types, Ubuntu for the rest."""
    return FAMILY_IMAGES.get(family(instance_type), UBUNTU) if gpus else UBUNTU


def choose_zone(
    offered: Mapping[str, Iterable[str]], zones_with_subnets: Iterable[str], wanted: str | None = None
) -> str | None:
    """A zone that offers every instance type (and has a subnet to use), or None.

    `offered` maps each instance type to the zones that offer it (DescribeInstanceTypeOfferings
    with location type availability-zone). With `wanted`, that zone or nothing. Otherwise the
    first such zone by name, so the choice is the same on every run.
    """
    common = set(zones_with_subnets)
    for zones in offered.values():
        common &= set(zones)
    if wanted is not None:
        return wanted if wanted in common else None
    return min(common) if common else None


def zone_problem(offered: Mapping[str, Iterable[str]], wanted: str | None, region: str) -> str:
    """The one line that says why no zone fits."""
    types = ", ".join(sorted(offered))
    if wanted:
        missing = sorted(t for t, zones in offered.items() if wanted not in set(zones))
        if missing:
            return f"zone {wanted} does not offer {', '.join(missing)}; remove trainrig:zone or pick a zone that does"
        return f"zone {wanted} has no default subnet; set trainrig:vpc to new or pick another zone"
    return f"no availability zone of {region} offers all of {types}; choose instance types offered in one zone"
