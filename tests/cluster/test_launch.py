"""A run's container and mpirun argument lists for Open MPI 4 and 5, the secrets file, and what pre-flight reads."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from cluster import images, launch, preflight
from cluster.jobs import JobSpec
from tests.helpers import make_inventory

PATHS = launch.RunPaths(run_id="j-1", run_dir="/data/trainrig/runs/j-1", shared="/data", code=False)


def spec_of(**fields) -> JobSpec:
    base = {
        "name": "j",
        "image": {"pull": "img:1"},
        "command": ["python3", "t.py", "--ck", "{checkpoint_dir}"],
        "nodes": 2,
        "gpus_per_node": 2,
    }
    return JobSpec.model_validate({**base, **fields})


def test_mpirun_for_open_mpi_4_launches_orted_in_each_container():
    argv = launch.mpirun_argv(
        spec_of(), make_inventory(gpu_nodes=3), PATHS, mpi_major=4, interfaces=["eth0"], secret_names=[]
    )
    assert argv == [
        "mpirun", "--allow-run-as-root", "-np", "4", "-H", "node0:2,node1:2", "--bind-to", "none", "--map-by", "slot",
        "--tag-output", "--mca", "orte_launch_agent", "docker exec -i trainrig-j-1 orted",
        "--mca", "plm_rsh_args", "-o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10",
        "--mca", "btl_tcp_if_include", "10.9.0.0/24", "--mca", "oob_tcp_if_include", "10.9.0.0/24",
        "-x", "NCCL_SOCKET_IFNAME=eth0",
        "python3", "t.py", "--ck", "/data/trainrig/runs/j-1/checkpoints",
    ]  # fmt: skip


def test_mpirun_for_open_mpi_5_launches_prted_through_prrte():
    argv = launch.mpirun_argv(
        spec_of(mpi={"mca": {"pml": "ob1"}}),
        make_inventory(gpu_nodes=2),
        PATHS,
        mpi_major=5,
        interfaces=["ens5", "eth0", "ens5"],
        secret_names=["WANDB_API_KEY"],
    )
    assert argv[argv.index("--launch-agent") + 1] == "docker exec -i trainrig-j-1 prted"
    assert argv[argv.index("--output") : argv.index("--output") + 2] == ["--output", "tag"]
    assert argv[argv.index("plm_ssh_args") - 1] == "--prtemca"
    assert argv[argv.index("oob_tcp_if_include") - 1] == "--prtemca"
    assert argv[argv.index("btl_tcp_if_include") - 1] == "--mca"  # an Open MPI parameter in both versions
    assert argv[argv.index("pml") - 1 : argv.index("pml") + 2] == ["--mca", "pml", "ob1"]
    assert "orte_launch_agent" not in argv and "NCCL_SOCKET_IFNAME=ens5,eth0" in argv
    # A secret is named, never valued, on the command line (ps shows it).
    assert argv[argv.index("WANDB_API_KEY") - 1] == "-x" and not any("=" in a and "WANDB" in a for a in argv)


def test_arguments_stay_single_arguments():
    spec = spec_of(command=["echo", "a b; rm -rf /", "{run_dir}", "{data_dir}", "{scratch_dir}"])
    argv = launch.mpirun_argv(spec, make_inventory(gpu_nodes=2), PATHS, mpi_major=4, interfaces=[], secret_names=[])
    assert argv[-5:] == ["echo", "a b; rm -rf /", "/data/trainrig/runs/j-1", "/data", "/data1"]


def test_container_of_a_gpu_node_with_nccl_defaults():
    inv = make_inventory(gpu_nodes=2, gpu_count=2)
    argv = launch.docker_run_argv(
        spec_of(env={"NCCL_DEBUG": "INFO"}),
        inv.gpu_nodes[0],
        PATHS,
        "sha256:abc",
        "unit",
        plain_env={"LD_LIBRARY_PATH": "/x"},
        memlock=True,
        with_secrets=True,
    )
    joined = shlex.join(argv)
    assert argv[:5] == ["docker", "run", "--detach", "--name", "trainrig-j-1"]
    for fragment in (
        "--label trainrig.run=j-1",
        "--network host",
        "--gpus all",
        "--shm-size 1g",
        "--ulimit memlock=-1",
        "--ulimit stack=67108864",
        "--volume /data:/data:rw",
        "--volume /root/.ssh:/root/.ssh:ro",
        "--volume /etc/ssh/ssh_known_hosts:/etc/ssh/ssh_known_hosts:ro",
        "--volume /run/trainrig/j-1.env:/run/trainrig/secrets.env:ro",
        "--env NCCL_DEBUG=INFO",
        "--env LD_LIBRARY_PATH=/x",
        "--env TRAINRIG_RUN_DIR=/data/trainrig/runs/j-1",
    ):
        assert fragment in joined, fragment
    assert argv[-2:] == ["sha256:abc", "infinity"] and argv[-4:-2] == ["--entrypoint", "sleep"]


def test_container_of_a_cpu_node_without_memlock_or_gpus():
    inv = make_inventory(gpu_nodes=2, gpu_count=0)
    argv = launch.docker_run_argv(
        spec_of(container={"ipc_host": True, "workdir": "/opt/app", "user": "root"}),
        inv.gpu_nodes[1],
        PATHS,
        "img",
        "unit",
        plain_env={},
        memlock=False,
        with_secrets=False,
    )
    assert "--gpus" not in argv and "memlock" not in " ".join(argv) and "--shm-size" not in argv
    assert argv[argv.index("--ipc") : argv.index("--ipc") + 2] == ["--ipc", "host"]
    assert argv[argv.index("--workdir") + 1] == "/opt/app" and "secrets.env" not in " ".join(argv)


def test_the_secrets_file_reads_back_exactly_through_a_shell(tmp_path):
    secrets = {"WANDB_API_KEY": 'k\'ey $(reboot) `x` \\ "q"', "OTHER": ""}
    path = tmp_path / "s.env"
    path.write_text(launch.secrets_text(secrets))
    out = subprocess.run(
        ["sh", "-c", f'set -a; . {path}; set +a; printf "%s\\n" "$WANDB_API_KEY"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == secrets["WANDB_API_KEY"] + "\n"


def test_exec_with_secrets_loads_them_only_inside_the_container():
    argv = launch.exec_argv("j-1", ["mpirun", "-x", "K", "t"], with_secrets=True)
    assert argv[:5] == ["docker", "exec", "trainrig-j-1", "sh", "-c"]
    assert argv[-4:] == ["mpirun", "-x", "K", "t"] and "/run/trainrig/secrets.env" in argv[5]
    assert launch.exec_argv("j-1", ["true"], with_secrets=False) == ["docker", "exec", "trainrig-j-1", "true"]


@pytest.mark.parametrize("output, address, expected", [
    ("1: lo    inet 127.0.0.1/8 scope host lo\n2: eth0@if9    inet 10.9.0.10/24 brd 10.9.0.255 scope global eth0",
     "10.9.0.10", "eth0"),
    ("2: ens5    inet 172.31.5.9/20 scope global ens5\n3: docker0    inet 172.17.0.1/16 scope global docker0",
     "172.31.5.9", "ens5"),
    ("3: docker0    inet 10.9.0.10/16 scope global docker0", "10.9.0.10", None),
    ("2: bond0    inet 10.45.19.37/26 scope global bond0", "10.45.19.99", None),
])  # fmt: skip
def test_the_private_interface_is_found_by_address(output, address, expected):
    assert preflight.interface_for(output, address) == expected


def test_open_mpi_major_version():
    assert preflight.mpi_major("mpirun (Open MPI) 4.1.4\n\nReport bugs to ...") == 4
    assert preflight.mpi_major("mpirun (Open MPI) 5.0.7") == 5
    assert preflight.mpi_major("HYDRA build details: MPICH 4.1") is None


def test_base_images_of_a_dockerfile(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "ARG BASE=debian:bookworm-slim\nARG CUDA\nFROM ${BASE} AS build\nFROM build\n"
        "FROM --platform=linux/amd64 nvcr.io/nvidia/cuda:${CUDA}-devel AS cuda\nFROM scratch\n"
    )
    assert images.base_images(dockerfile, {"CUDA": "12.4"}) == [
        "debian:bookworm-slim",
        "nvcr.io/nvidia/cuda:12.4-devel",
    ]
