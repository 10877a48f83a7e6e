"""trainrig's library: inventory, provisioning, job launch, monitoring, results and teardown."""
