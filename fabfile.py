"""Entry point for `fab`: the tasks live in cluster/tasks.py."""

from cluster.tasks import namespace  # noqa: F401
