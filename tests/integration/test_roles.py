"""The roles on a real local cluster: data disk, Docker on it, registry login, per-host failures,
--retry-failed; and the GPU, NFS and RAID roles in check mode (no GPU, kernel NFS or md here)."""

import json

import pytest

from cluster import provision
from infra import keys, ssh
from infra.commands import wait_until
from infra.inventory import SharedStorage
from tests.integration.conftest import CLUSTER, REGISTRY, REGISTRY_USER, node_exec

pytestmark = pytest.mark.integration
GPU_NODES = ("node0", "node1")


def on(inv, name, *argv, check=True):
    with ssh.open_checked(inv, inv.node(name)) as conn:
        return ssh.run(conn, list(argv), check=check, timeout=120)


def written(recap, host, path):
    """Content a file-writing task wrote (or in check mode would write) to path on host."""
    files = recap.hosts[host].files
    matches = [content for header, content in files.items() if header == path]
    assert matches, f"{host}: nothing written to {path}; written: {sorted(files)}"
    return matches[-1]


# -- data disk and Docker, for real -----------------------------------------------------------


def test_data_disk_is_mounted_by_uuid_with_noatime_nofail(cluster, provisioned):
    for node in cluster.nodes:
        source, fstype, options = on(
            cluster, node.name, "findmnt", "--noheadings", "--output", "SOURCE,FSTYPE,OPTIONS", "/data1"
        ).stdout.split()
        assert (source, fstype) == ("/dev/xvdc", "ext4") and "noatime" in options.split(",")
        uuid = on(cluster, node.name, "blkid", "-s", "UUID", "-o", "value", "/dev/xvdc").stdout.strip()
        assert on(cluster, node.name, "blkid", "-s", "LABEL", "-o", "value", "/dev/xvdc").stdout.strip() == "data1"
        fstab = [line.split() for line in on(cluster, node.name, "cat", "/etc/fstab").stdout.splitlines()]
        assert [f"UUID={uuid}", "/data1", "ext4", "noatime,nofail", "0", "2"] in fstab


def test_docker_keeps_its_data_on_the_data_disk_and_runs_a_container(cluster, provisioned):
    for name in GPU_NODES:
        daemon = json.loads(on(cluster, name, "cat", "/etc/docker/daemon.json").stdout)
        assert daemon["data-root"] == "/data1/docker" and daemon["log-opts"]["max-size"]
        assert "default-runtime" not in daemon  # no GPU here, so no NVIDIA runtime
        info = on(cluster, name, "docker", "info", "--format", "{{.DockerRootDir}} {{.Driver}}").stdout.split()
        assert info == ["/data1/docker", "overlay2"]
    # No registry to pull from: a real image made of the node's own echo and the libraries it needs.
    on(
        cluster,
        "node0",
        "sh",
        "-c",
        "tar -ch $(ldd /usr/bin/echo | grep -o '/[^ ]*') /usr/bin/echo 2>/dev/null"
        " | docker import - trainrig-test/echo:1",
    )
    out = on(
        cluster, "node0", "docker", "run", "--rm", "trainrig-test/echo:1", "/usr/bin/echo", "hello from a container"
    )
    assert out.stdout.strip() == "hello from a container"


def test_storage_node_gets_no_docker(cluster, provisioned):
    assert on(cluster, "storage", "sh", "-c", "command -v dockerd", check=False).exited != 0


# -- registry login ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def logged_in(cluster, registry):
    first = provision.provision(cluster, tags="docker,registry_login")
    again = provision.provision(cluster, tags="docker,registry_login")
    return first, again


def test_registry_login_works_and_is_idempotent(cluster, registry, logged_in):
    first, again = logged_in
    assert all(first.hosts[n].changed > 0 for n in GPU_NODES)
    assert {h: r.changed for h, r in again.hosts.items()} == {"node0": 0, "node1": 0, "storage": 0}
    # Logged in for real: node0 pushes an image the registry only takes with a valid login, node1 pulls it.
    image = f"{REGISTRY}/trainrig-test/echo:1"
    on(
        cluster,
        "node0",
        "sh",
        "-c",
        f"tar -ch $(ldd /usr/bin/echo | grep -o '/[^ ]*') /usr/bin/echo 2>/dev/null | docker import - {image}",
    )
    on(cluster, "node0", "docker", "push", image)
    on(cluster, "node1", "docker", "pull", image)
    assert on(cluster, "node1", "docker", "run", "--rm", image, "/usr/bin/echo", "pulled").stdout.strip() == "pulled"


def test_registry_refuses_a_wrong_password(cluster, registry, logged_in):
    wrong = node_exec(
        CLUSTER,
        "node1",
        "sh",
        "-c",
        f"docker --config /tmp/no-login login -u {REGISTRY_USER} --password-stdin {REGISTRY}; echo rc=$?",
        input="not-the-password",
    )
    assert "rc=0" not in wrong.stdout and "unauthorized" in (wrong.stdout + wrong.stderr).lower()


def test_registry_secret_is_never_logged(cluster, registry, logged_in, tmp_path):
    # ansible-runner's own event files would be where a leak shows: run once keeping them.
    node_exec(CLUSTER, "node1", "rm", "-f", "/root/.docker/config.json")
    recap = provision.provision(cluster, tags="registry_login", keep_artifacts=tmp_path)
    assert recap.hosts["node1"].changed == 1
    # Every file ansible-runner left: output, events, inventory, env files, artifacts. (It
    # records the whole process environment in artifacts/<id>/command; provision removes that.)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.name == "job_events" for p in files)
    dumped = "".join(p.read_text(errors="replace") for p in files)
    assert "Log Docker in" in dumped and registry not in dumped


def test_a_data_disk_named_by_a_udev_link(cluster, provisioned):
    # How AWS inventories name an EBS volume on Nitro: a /dev/disk/by-id link carrying its id.
    link = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
    node_exec(CLUSTER, "node0", "mkdir", "-p", "/dev/disk/by-id")
    node_exec(CLUSTER, "node0", "ln", "-sfn", "/dev/xvdc", link)
    size = cluster.node("node0").data_disks[0].size_gb
    recap = provision.provision(
        cluster,
        tags="data_disk",
        host_vars={"node0": {"data_disk_devices": [link], "data_disk_expected_gb": {link: size}}},
    )
    assert recap.hosts["node0"].succeeded and recap.hosts["node0"].changed == 0, "the same disk, already ours"


# -- bad input: one clear line for the bad host, the others unaffected --------------------------

BAD_INPUT = [
    {
        "id": "disk-missing",
        "tags": "data_disk",
        "host_vars": {"data_disk_devices": ["/dev/xvdz"]},
        "message": "data_disk: /dev/xvdz is not there",
    },
    {
        "id": "disk-formatted",
        "tags": "data_disk",
        "host_vars": {"data_disk_label": "scratch"},
        "message": "data_disk: /dev/xvdc already holds a ext4 file system (label 'data1'); not formatting it",
    },
    # The named device is there but is not the disk the inventory ordered (a local NVMe, say).
    {
        "id": "disk-wrong-size",
        "tags": "data_disk",
        "host_vars": {"data_disk_expected_gb": {"/dev/xvdc": 3800}},
        "message": "GiB, not 3800 GB; not formatting it",
    },
    {
        "id": "secret-unset",
        "tags": "registry_login",
        "host_vars": {"registry_login_password_env": "TRAINRIG_TEST_UNSET"},
        "message": "registry_login: TRAINRIG_TEST_UNSET is not set",
    },
    {
        "id": "unsupported-os",
        "tags": "docker",
        "host_vars": {"docker_supported_platforms": {"Ubuntu": ["24"]}},
        "message": "docker: Debian 12",
    },
    {
        "id": "nfs-without-storage",
        "tags": "nfs_client",
        "host_vars": {"nfs_client_server": ""},
        "message": "nfs_client: NFS is asked for but the inventory has no storage node",
    },
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda c: c["id"])
def test_bad_input_fails_that_host_only(cluster, registry, logged_in, case):
    with pytest.raises(provision.ProvisionFailed) as failed:
        provision.provision(cluster, tags=case["tags"], host_vars={"node1": case["host_vars"]})
    recap = failed.value.recap
    assert recap.failed_hosts == ["node1"]
    assert case["message"] in recap.hosts["node1"].message and "\n" not in recap.hosts["node1"].message
    assert "node1" in str(failed.value)
    assert all(r.succeeded and r.changed == 0 for h, r in recap.hosts.items() if h != "node1")


def test_no_storage_node_in_the_inventory(cluster, provisioned):
    bare = cluster.model_copy(update={"storage": None})
    with pytest.raises(provision.ProvisionFailed) as failed:
        provision.provision(bare, tags="nfs_client")
    assert failed.value.recap.failed_hosts == list(GPU_NODES)
    assert "no storage node" in failed.value.recap.hosts["node0"].message


# -- an unreachable host, then --retry-failed ---------------------------------------------------


def test_unreachable_host_then_retry_failed(cluster, provisioned):
    node = cluster.node("node1")
    node_exec(CLUSTER, "node1", "systemctl", "stop", "ssh.service")
    # Ansible's ControlPersist master would outlive sshd's listener: close it, as a dropped link would.
    provision.close_connection(cluster, node)
    try:
        with pytest.raises(provision.ProvisionFailed) as failed:
            provision.provision(cluster, tags="common,ssh_mesh")
        recap = failed.value.recap
        assert recap.failed_hosts == ["node1"] and recap.hosts["node1"].unreachable
        assert recap.hosts["node0"].succeeded and recap.hosts["storage"].succeeded
    finally:
        node_exec(CLUSTER, "node1", "systemctl", "start", "ssh.service")
        wait_until(lambda: ssh.reachable(cluster, node), timeout=60, interval=0.5, what="node1's sshd to answer again")
    # The healthy nodes kept node1's key while it was away, so the mesh holds both ways.
    assert on(cluster, "node0", "ssh", "-o", "BatchMode=yes", "node1", "hostname").stdout.strip() == "node1"
    retried = provision.provision(cluster, tags="common,ssh_mesh", retry_failed=True)
    assert list(retried.hosts) == ["node1"] and retried.failed_hosts == []
    for src, dst in (("node0", "node1"), ("node1", "node0"), ("node1", "storage")):
        assert on(cluster, src, "ssh", "-o", "BatchMode=yes", dst, "hostname").stdout.strip() == dst


def test_provisioning_refuses_a_node_whose_host_key_changed(cluster, provisioned):
    # Mitogen starts ssh itself: it must still check the node's key against the pinned one.
    impostor = keys.bare(keys.generate().public_openssh)
    nodes = [n.model_copy(update={"host_key": impostor}) if n.name == "node0" else n for n in cluster.nodes]
    tampered = cluster.model_copy(update={"nodes": nodes})
    assert provision.ansible_env(tampered)["ANSIBLE_STRATEGY"] == "mitogen_linear"
    with pytest.raises(provision.ProvisionFailed) as failed:
        provision.provision(tampered, tags="common", check=True)
    recap = failed.value.recap
    assert recap.failed_hosts == ["node0"] and recap.hosts["node0"].unreachable
    assert recap.hosts["node1"].succeeded and recap.hosts["storage"].succeeded


# -- a login that is not root: every task through sudo ------------------------------------------

LOGIN = "trainrig-login"
ADD_LOGIN = f"""id {LOGIN} >/dev/null 2>&1 || useradd -m -s /bin/bash {LOGIN}
install -d -m 0700 -o {LOGIN} -g {LOGIN} /home/{LOGIN}/.ssh
install -m 0600 -o {LOGIN} -g {LOGIN} /root/.ssh/authorized_keys /home/{LOGIN}/.ssh/authorized_keys
echo '{LOGIN} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/{LOGIN} && chmod 0440 /etc/sudoers.d/{LOGIN}"""


def sudo_log(name):
    return node_exec(CLUSTER, name, "journalctl", "-q", "--no-pager", "_COMM=sudo").stdout


def test_a_login_that_is_not_root_provisions_through_sudo(cluster, provisioned):
    # A cloud image's login (ubuntu, admin) is not root: trainrig sets ansible_become, and the
    # default strategy (Mitogen's, with its own sudo) must run every task as root through it.
    assert provision.ansible_env(cluster)["ANSIBLE_STRATEGY"] == "mitogen_linear"
    names = [n.name for n in cluster.nodes]
    for name in names:
        node_exec(CLUSTER, name, "sh", "-c", ADD_LOGIN)
    # Nothing else on a node uses sudo (trainrig logs in as root): new sessions are provisioning's.
    opened = "session opened for user root(uid=0)"
    before = {name: sudo_log(name).count(opened) for name in names}
    try:
        recap = provision.provision(cluster.model_copy(update={"ssh_user": LOGIN}), tags="common")
        assert {h: (r.succeeded, r.changed) for h, r in recap.hosts.items()} == {n: (True, 0) for n in names}
        for name in names:
            log = sudo_log(name)
            assert log.count(opened) > before[name], log[-1000:]
    finally:
        for name in names:
            node_exec(CLUSTER, name, "sh", "-c", f"rm -f /etc/sudoers.d/{LOGIN}; userdel -r {LOGIN} 2>/dev/null; true")


# -- GPU, NFS and RAID in check mode: the files they would write --------------------------------


def test_gpu_host_in_check_mode(cluster, provisioned):
    before = on(cluster, "node0", "cat", "/etc/docker/daemon.json").stdout
    recap = provision.provision(
        cluster,
        tags="nvidia_driver,docker,nvidia_container_toolkit",
        check=True,
        # A GPU host as sysfs would show it; this sandbox's kernel is not Debian's, so no headers package.
        extravars={"gpu_facts_nvidia_present": True, "nvidia_driver_kernel_packages": ["dkms"]},
    )
    daemon = json.loads(written(recap, "node0", "/etc/docker/daemon.json"))
    assert daemon["default-runtime"] == "nvidia"
    assert daemon["runtimes"]["nvidia"]["path"] == "/usr/bin/nvidia-container-runtime"
    assert daemon["data-root"] == "/data1/docker" and daemon["live-restore"] is True
    # A local node is itself a container: it may not lift the locked-memory limit (clouds do).
    assert "default-ulimits" not in daemon
    # Written for real by the provisioning before (check mode shows only what would change).
    drop_in = on(cluster, "node0", "cat", "/etc/systemd/system/docker.service.d/trainrig-data-root.conf").stdout
    assert "RequiresMountsFor=/data1/docker" in drop_in
    assert "blacklist nouveau" in written(recap, "node0", "/etc/modprobe.d/blacklist-nouveau.conf")
    # NVIDIA's HTTPS repository through the storage node's package cache first, directly second.
    mirror_list = "/etc/apt/mirrors/nvidia-container-toolkit.list"
    assert written(recap, "node0", "/etc/apt/sources.list.d/nvidia-container-toolkit.list") == (
        f"deb [signed-by=/etc/apt/keyrings/nvidia-container-toolkit.asc] mirror+file:{mirror_list} /\n"
    )
    mirrors = [line.split("\t")[0] for line in written(recap, "node0", mirror_list).splitlines()[1:]]
    assert mirrors == [
        "http://HTTPS///nvidia.github.io/libnvidia-container/stable/deb/amd64",
        "https://nvidia.github.io/libnvidia-container/stable/deb/amd64",
    ]
    rule = written(recap, "node0", "/etc/udev/rules.d/71-nvidia-dev-char.rules")
    assert "nvidia-ctk system create-dev-char-symlinks --create-all" in rule
    assert on(cluster, "node0", "cat", "/etc/docker/daemon.json").stdout == before  # check mode changed nothing


def test_nfs_in_check_mode(cluster, provisioned):
    recap = provision.provision(
        cluster,
        tags="nfs",
        check=True,
        extravars={"nfs_server_kernel_support": True, "nfs_client_kernel_support": True},
    )
    exports = written(recap, "storage", "/etc/exports.d/trainrig.exports")
    # Every node's own private address, never the network's CIDR (IBM classic's is 10.0.0.0/8).
    clients = " ".join(f"{n.private_address}(rw,sync,no_subtree_check,root_squash)" for n in cluster.nodes)
    assert f"/data {clients}" in exports.splitlines()
    assert "threads=64" in written(recap, "storage", "/etc/nfs.conf.d/trainrig.conf").splitlines()
    assert str(cluster.network.cidr) not in exports
    server = cluster.node("storage").private_address
    for name in GPU_NODES:
        fstab = written(recap, name, "/etc/fstab").splitlines()
        assert f"{server}:/data /data nfs rw,hard,nconnect=8,_netdev,nofail,x-systemd.automount 0 0" in fstab
    assert "nfs" not in on(cluster, "node0", "cat", "/etc/fstab").stdout


def task_results(artifacts, host, task):
    """(event, result) of every run of a task on host, from the job events that keep_artifacts kept."""
    events = [json.loads(p.read_text()) for p in artifacts.rglob("job_events/*.json")]
    return [
        (e["event"], e["event_data"].get("res", {}))
        for e in sorted(events, key=lambda e: e["counter"])
        if e.get("event_data", {}).get("host") == host
        and e["event_data"].get("task") == task
        and e["event"] in ("runner_on_ok", "runner_on_skipped", "runner_on_failed")
    ]


def test_gpu_facts_find_no_gpu_on_the_local_nodes(cluster, provisioned, tmp_path):
    # This host's PCI bus has no NVIDIA device: no GPU, no NVSwitch, no error, and nothing GPU is done.
    recap = provision.provision(
        cluster, tags="nvidia_driver,docker,nvidia_container_toolkit", check=True, keep_artifacts=tmp_path
    )
    for name in GPU_NODES:
        assert recap.hosts[name].succeeded and recap.hosts[name].changed == 0
        # Three plays depend on the facts; the bus is read once.
        [(event, res)] = task_results(tmp_path, name, "Record the NVIDIA GPUs and NVSwitches on the PCI bus")
        assert event == "runner_on_ok"
        facts = res["ansible_facts"]
        assert (
            facts["gpu_facts_nvidia_gpus"],
            facts["gpu_facts_nvidia_present"],
            facts["gpu_facts_nvswitch_present"],
        ) == ([], False, False)
        # Both GPU roles end before their first GPU task: not even a skipped one per node.
        for task in (
            "Look for a driver that is already loaded",
            "Install the headers, dkms and the driver branch (and the NVSwitch fabric manager)",
            "Install the toolkit",
        ):
            assert task_results(tmp_path, name, task) == [], task
        said = [
            res.get("msg")
            for _, res in task_results(tmp_path, name, "Say why there is nothing to do on a host without NVIDIA GPUs")
        ]
        assert said == [
            f"{role}: no NVIDIA GPU on the PCI bus; skipped" for role in ("nvidia_driver", "nvidia_container_toolkit")
        ]


def test_gpu_count_without_a_gpu_on_the_bus_fails_that_host(cluster, provisioned):
    with pytest.raises(provision.ProvisionFailed) as failed:
        provision.provision(cluster, tags="nvidia_driver", check=True, host_vars={"node1": {"trainrig_gpu_count": 2}})
    recap = failed.value.recap
    assert recap.failed_hosts == ["node1"]
    message = recap.hosts["node1"].message
    assert "gpu_facts: the inventory says 2 GPU(s) but none is on the PCI bus" in message and "\n" not in message
    assert recap.hosts["node0"].succeeded


def test_nvswitch_host_in_check_mode(cluster, provisioned, tmp_path):
    # NVSwitches as sysfs would show them (p4d.24xlarge); node1 has the fabric manager off.
    recap = provision.provision(
        cluster,
        tags="nvidia_driver",
        check=True,
        keep_artifacts=tmp_path,
        extravars={
            "gpu_facts_nvidia_present": True,
            "gpu_facts_nvswitch_present": True,
            "nvidia_driver_kernel_packages": ["dkms"],
        },
        host_vars={"node1": {"nvidia_driver_fabricmanager": False}},
    )
    assert recap.failed_hosts == []
    # The packages the install step takes, as the apt candidate probe before it looked them up: on
    # NVSwitch hosts the fabric manager's meta package, which pins driver and fabric manager to one version.
    expected = {"node0": ["cuda-drivers-fabricmanager-580"], "node1": ["cuda-drivers-580"]}
    for name, packages in expected.items():
        [(event, res)] = task_results(tmp_path, name, "Look up the install candidates of the driver packages")
        assert event == "runner_on_ok" and [r["item"] for r in res["results"]] == packages
        assert [r["cmd"] for r in res["results"]] == [["apt-cache", "policy", p] for p in packages]
        # The repository is only rehearsed, so neither the install nor the service can run for real.
        [(event, _)] = task_results(tmp_path, name, "Run the NVIDIA fabric manager and start it at boot")
        assert event == "runner_on_skipped"
    # The keyring package is downloaded to be installed: a rehearsal skips it and changes nothing.
    [(event, _)] = task_results(
        tmp_path, "node0", "Install NVIDIA's cuda-keyring (the CUDA repository's key and apt source)"
    )
    assert event == "runner_on_skipped"
    assert on(cluster, "node0", "test", "-e", "/etc/modprobe.d/blacklist-nouveau.conf", check=False).exited != 0


def test_efs_mount_in_check_mode(cluster, provisioned):
    # An AWS cluster with EFS: no storage node; the GPU nodes mount the mount target's address.
    efs = cluster.model_copy(
        update={
            "nodes": cluster.gpu_nodes,
            "storage": SharedStorage(kind="efs", server="10.42.0.99", export="/", mount_point="/data"),
        }
    )
    recap = provision.provision(efs, tags="nfs", check=True, extravars={"nfs_client_kernel_support": True})
    assert set(recap.hosts) == set(GPU_NODES)
    for name in GPU_NODES:
        fstab = written(recap, name, "/etc/fstab").splitlines()
        assert f"10.42.0.99:/ /data nfs {provision.EFS_MOUNT_OPTIONS} 0 0" in fstab


def test_nfs_not_asked_for_ends_the_client_role_before_any_probe(cluster, provisioned, tmp_path):
    # nfs_client_enabled=false (provision-vars.yml): the GPU nodes neither probe the kernel nor mount.
    recap = provision.provision(
        cluster,
        tags="nfs",
        check=True,
        keep_artifacts=tmp_path,
        extravars={"nfs_client_enabled": False, "nfs_client_kernel_support": True},
    )
    for name in GPU_NODES:
        assert recap.hosts[name].succeeded and "/etc/fstab" not in recap.hosts[name].files
        for task in ("Check whether the kernel can mount NFS", "Mount the share at boot, on first access"):
            assert task_results(tmp_path, name, task) == [], task
        [(event, _)] = task_results(tmp_path, name, "Fail early on a platform this role does not support")
        assert event == "runner_on_ok"  # the role did start


def test_raid0_in_check_mode(cluster, provisioned):
    disks = [{"device": f"/dev/nvme{i}n1", "fstype": "", "label": "", "uuid": ""} for i in (1, 2)]
    recap = provision.provision(
        cluster, tags="data_disk", check=True, extravars={"data_disk_devices": [], "data_disk_found": disks}
    )
    mdadm = written(recap, "node0", "/etc/mdadm/mdadm.conf")
    assert "ARRAY /dev/md/data1 level=raid0 num-devices=2 name=data1 devices=/dev/nvme1n1,/dev/nvme2n1" in mdadm
    fstab = [line.split() for line in written(recap, "node0", "/etc/fstab").splitlines()]
    assert [f[1:4] for f in fstab if len(f) > 3 and f[1] == "/data1"] == [["/data1", "ext4", "noatime,nofail"]]
    assert on(cluster, "node0", "test", "-e", "/etc/mdadm/mdadm.conf", check=False).exited != 0
