"""Builders shared by the tests."""

from infra.inventory import Inventory, Network, Node, SharedStorage

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAQHDOs7A57fvovP7g2e+O4W3SzawSL2jIFqPcjx2Mb"


def make_node(name, role="gpu", index=0, gpu_count=0, port=None):
    return Node(
        name=name,
        role=role,
        public_address="127.0.0.1",
        private_address=f"10.9.0.{10 + index}",
        ssh_port=port or 2200 + index,
        host_key=KEY,
        gpu_count=gpu_count,
        gpu_model="V100" if gpu_count else None,
        cpus=8,
        hourly_price_usd=1.5 if role == "gpu" else 0.2,
    )


def make_inventory(gpu_nodes=2, gpu_count=0, user="root", cluster="unit") -> Inventory:
    nodes = [make_node(f"node{i}", index=i, gpu_count=gpu_count) for i in range(gpu_nodes)]
    nodes.append(make_node("storage", role="storage", index=gpu_nodes))
    return Inventory(
        cluster=cluster,
        cloud="local",
        ssh_user=user,
        ssh_private_key="/k/id_ed25519",
        nodes=nodes,
        storage=SharedStorage(server="storage", export="/data", mount_point="/data"),
        network=Network(name="n", cidr="10.9.0.0/24"),
    )
