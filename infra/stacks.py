"""Stack files in stacks/: find one by name, validate it, and price it (what `fab plan` shows)."""

from __future__ import annotations

import os
from pathlib import Path

from cluster.errors import TrainrigError
from infra import config, plan

ROOT = Path(__file__).resolve().parents[1]


def available(root: Path = ROOT) -> list[str]:
    return sorted(p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in (root / "stacks").glob("Pulumi.*.yaml"))


def load(stack: str | None, root: Path = ROOT, environ=os.environ) -> config.StackConfig:
    """A validated stack config with its credentials checked, or a one-line error."""
    if not stack:
        raise TrainrigError(f"no stack selected; pass --stack NAME (one of: {', '.join(available(root))}) "
                            "or set trainrig.stack in your Fabric config")
    cfg = config.load_stack_file(config.stack_file(stack, root))
    config.check_credentials(cfg, environ)
    return cfg


def plan_table(stack: str | None, root: Path = ROOT, environ=os.environ):
    return plan.table(plan.plan(load(stack, root, environ)))
