"""The Pulumi program (Pulumi.yaml: main: infra/): validate the stack config, build a GpuCluster, export inventory."""

import pulumi
from pulumi.runtime import config as runtime_config

from infra import config
from infra.component import GpuCluster, GpuClusterArgs
from infra.errors import TrainrigError

try:
    settings = config.from_pulumi_config({**runtime_config.get_config_env(), **runtime_config.CONFIG.get()})
    settings.check_credentials()
except TrainrigError as exc:
    # A RunError is shown as its message alone: one line, no Python traceback under `pulumi up`.
    raise pulumi.RunError(str(exc)) from None
cluster = GpuCluster(settings.cluster, GpuClusterArgs(settings))
pulumi.export("inventory", cluster.inventory)
pulumi.export("hourly_cost_usd", cluster.hourly_cost_usd)
