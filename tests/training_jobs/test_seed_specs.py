"""The seed workloads' job specs: the values each seed needs, the container and mpirun lines trainrig
makes of them, their metric patterns against the lines each trainer prints, and the README."""

import dataclasses
import re
import runpy
from pathlib import Path

import pytest

from cluster import images, jobs, launch
from cluster.remote import supervisor
from tests.helpers import make_inventory

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "training_jobs"
EVERY_JOB = sorted(JOBS.glob("*.yaml"))
RUN_DIR = "/data/trainrig/runs/r-1"
PATHS = launch.RunPaths(run_id="r-1", run_dir=RUN_DIR, shared="/data", code=False)
CIDR = "10.9.0.0/24"  # the private network of tests.helpers.make_inventory


def load(file_name: str) -> jobs.LoadedJob:
    return jobs.load(JOBS / file_name)


def mpirun(job: jobs.LoadedJob, *, gpu_count: int, mpi_major: int = 4, resume_from: str = "") -> list[str]:
    spec = job.spec
    return launch.mpirun_argv(
        spec,
        make_inventory(gpu_nodes=spec.nodes, gpu_count=gpu_count),
        dataclasses.replace(PATHS, resume_from=resume_from),
        mpi_major=mpi_major,
        interfaces=["eth0"],
        secret_names=sorted(spec.secrets),
    )


def command(job: jobs.LoadedJob, **kwargs) -> list[str]:
    """The job's own command as mpirun runs it, placeholders filled in."""
    return mpirun(job, gpu_count=job.spec.gpus_per_node, **kwargs)[-len(job.spec.command) :]


def docker_run(job: jobs.LoadedJob, *, with_secrets: bool = False) -> list[str]:
    spec = job.spec
    node = make_inventory(gpu_nodes=spec.nodes, gpu_count=spec.gpus_per_node).gpu_nodes[0]
    return launch.docker_run_argv(
        spec, node, PATHS, "sha256:abc", "unit", plain_env={}, memlock=True, with_secrets=with_secrets
    )


def after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def base_images(job: jobs.LoadedJob) -> list[str]:
    build = job.spec.image.build
    assert build is not None and job.build_context is not None
    return images.base_images(job.build_context / build.dockerfile, build.args)


def mca_names(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg in ("--mca", "--prtemca")]


# ----------------------------------------------------------------- seed 001: OpenSeq2Seq


@pytest.mark.parametrize("mpi_major", [3, 4])  # its image (NGC TensorFlow 19.05) has Open MPI 3.1
def test_openseq2seq_runs_the_seeds_mpirun_on_2_nodes_of_2_gpus(mpi_major):
    job = load("openseq2seq-transformer.yaml")
    spec = job.spec
    assert (spec.nodes, spec.gpus_per_node, spec.ranks, spec.max_steps) == (2, 2, 4, 50000)
    argv = mpirun(job, gpu_count=2, mpi_major=mpi_major)
    assert argv[2:6] == ["-np", "4", "-H", "node0:2,node1:2"]
    assert after(argv, "--bind-to") == "none" and after(argv, "--map-by") == "slot"
    # The seed's btl_tcp_if_include eth0 and NCCL_SOCKET_IFNAME=eth0 come from trainrig, once each,
    # as the cluster's private network: Open MPI refuses an MCA parameter named twice.
    assert mca_names(argv).count("btl_tcp_if_include") == 1 and after(argv, "btl_tcp_if_include") == CIDR
    assert [a for a in argv if a.startswith("NCCL_SOCKET_IFNAME=")] == ["NCCL_SOCKET_IFNAME=eth0"]
    assert spec.env["NCCL_DEBUG"] == "INFO" and "NCCL_SOCKET_IFNAME" not in spec.env
    assert spec.env_from_host == ["LD_LIBRARY_PATH"]
    assert argv[-len(spec.command) :] == [
        "python", "run.py", "--config_file=/opt/trainrig/transformer-base.py", "--use_horovod=True",
        "--mode=train_eval", f"--logdir={RUN_DIR}/en-de-transformer", "--max_steps=50000", "--load_model=",
    ]  # fmt: skip


def test_openseq2seq_uses_the_seeds_image_and_working_directory():
    job = load("openseq2seq-transformer.yaml")
    assert base_images(job) == ["nvcr.io/nvidia/tensorflow:19.05-py3"]
    assert job.spec.container.workdir == "/opt/OpenSeq2Seq"
    dockerfile = (job.build_context / "Dockerfile").read_text()
    assert (
        "/opt/OpenSeq2Seq" in dockerfile and "COPY transformer-base.py /opt/trainrig/transformer-base.py" in dockerfile
    )


def test_openseq2seq_resumes_from_an_earlier_logdir():
    earlier = "/data/trainrig/runs/r-0/en-de-transformer/best_models"
    assert command(load("openseq2seq-transformer.yaml"), resume_from=earlier)[-1] == f"--load_model={earlier}"


OPENSEQ2SEQ_CONFIG = JOBS / "openseq2seq" / "transformer-base.py"
PLACEHOLDER = "[REPLACE THIS TO THE PATH WITH YOUR WMT DATA]"


def stand_in_example() -> dict:
    """The shape of OpenSeq2Seq's en-de transformer-base.py, with values of our own."""

    def section(repeat: bool) -> dict:
        files = {key: f"{PLACEHOLDER}{key}.tok" for key in ("src_vocab_file", "tgt_vocab_file")}
        files |= {key: f"{PLACEHOLDER}{key}.txt" for key in ("source_file", "target_file")}
        return {"batch_size_per_gpu": 16, "data_layer_params": {**files, "repeat": repeat, "max_length": 56}}

    return {
        "data_root": PLACEHOLDER,
        "base_model": object(),
        "base_params": {"use_horovod": True, "batch_size_per_gpu": 128, "max_steps": 300000, "dtype": "float32"},
        "train_params": section(True),
        "eval_params": section(False),
        "infer_params": section(False),
    }


def run_config(monkeypatch, example: dict) -> dict:
    real = runpy.run_path
    example_path = "/opt/OpenSeq2Seq/example_configs/text2text/en-de/transformer-base.py"
    monkeypatch.setattr(runpy, "run_path", lambda path, *a, **k: example if path == example_path else real(path))
    return real(str(OPENSEQ2SEQ_CONFIG))


def test_openseq2seq_config_applies_the_seeds_edits_to_the_example(monkeypatch):
    monkeypatch.setenv("WMT16_DE_EN", "/data/wmt")
    example = stand_in_example()
    config = run_config(monkeypatch, example)
    assert config["base_model"] is example["base_model"]
    assert config["base_params"] == {
        "use_horovod": True,
        "batch_size_per_gpu": 256,
        "max_steps": 50000,
        "dtype": "mixed",
        "loss_scaling": "Backoff",
        "load_model": "",
    }
    for name in ("train_params", "eval_params", "infer_params"):
        layer = config[name]["data_layer_params"]
        assert (
            layer["source_file"] == "/data/wmt/source_file.txt"
            and layer["src_vocab_file"] == "/data/wmt/src_vocab_file.tok"
        )
        assert layer["max_length"] == 56
    assert config["eval_params"]["data_layer_params"]["repeat"] is True
    assert config["infer_params"]["data_layer_params"]["repeat"] is False
    assert example["eval_params"]["data_layer_params"]["repeat"] is False  # the example itself is left alone
    assert example["base_params"]["dtype"] == "float32"


def test_openseq2seq_config_finds_the_data_on_the_shared_storage_by_default(monkeypatch):
    monkeypatch.delenv("WMT16_DE_EN", raising=False)
    config = run_config(monkeypatch, stand_in_example())
    assert config["train_params"]["data_layer_params"]["target_file"] == "/data/wmt16_de_en/target_file.txt"
    assert load("openseq2seq-transformer.yaml").spec.env["WMT16_DE_EN"] == "/data/wmt16_de_en"


# ----------------------------------------------------------------- seed 004: MXNet ResNet-152


def test_mxnet_resnet152_is_128_horovod_ranks_with_the_seeds_batch_per_gpu_and_rate():
    """16 p3.16xlarge (8 V100 each): the seed's p2.16xlarge K80s are refused (no supported driver)."""
    job = load("mxnet-resnet152.yaml")
    spec = job.spec
    assert (spec.nodes, spec.gpus_per_node, spec.ranks) == (16, 8, 128)
    argv = mpirun(job, gpu_count=8)
    assert after(argv, "-H") == ",".join(f"node{i}:8" for i in range(16))
    own = argv[-len(spec.command) :]
    assert after(own, "--model") == "resnet152_v1" and after(own, "--num-epochs") == "1"
    # The seed's --batch-size 8192 was 32 per K80 across 256; the Horovod example takes it per GPU.
    assert int(after(own, "--batch-size")) == 32
    # train_imagenet.py's learning rate 0.1 for the whole batch; the example multiplies by the ranks.
    assert float(after(own, "--lr")) * spec.ranks == pytest.approx(0.1)
    assert (
        after(own, "--rec-train") == "/data/imagenet/train.rec" and after(own, "--rec-val") == "/data/imagenet/val.rec"
    )
    assert "--ipc" in docker_run(job) and after(docker_run(job), "--ipc") == "host"


def test_mxnet_image_keeps_the_seeds_cuda_10_2_build():
    job = load("mxnet-resnet152.yaml")
    assert base_images(job) == ["nvidia/cuda:10.2-cudnn7-devel-ubuntu18.04"]
    dockerfile = (job.build_context / "Dockerfile").read_text()
    assert "MXNET_PACKAGE=mxnet-cu102==" in dockerfile  # the last wheels with Kepler kernels
    assert "ARG OPENMPI_VERSION=4." in dockerfile  # Ubuntu 18.04's own Open MPI is 2.1


# ----------------------------------------------------------------- seed 000: Show, Attend and Tell


def test_show_attend_tell_keeps_the_seeds_nfs_and_local_disk_layout():
    job = load("show-attend-tell.yaml")
    spec = job.spec
    assert (spec.nodes, spec.gpus_per_node) == (1, 1)
    argv = docker_run(job)
    assert after(argv, "--shm-size") == "30g" and after(argv, "--workdir") == "/home"
    volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "--volume"]
    # The notebook's CURRENT_PATH ('.', i.e. /home) on the shared storage, its LOCAL_PATH
    # (/home/data1/Project/work2) on the node's own data disk.
    assert f"{PATHS.shared}/show-attend-tell:/home:rw" in volumes
    assert f"{launch.DATA_DISK}/show-attend-tell:/home/data1:rw" in volumes
    assert command(job)[:4] == ["papermill", "--log-output", "--cwd", "/home"]
    assert command(job)[-1] == f"{RUN_DIR}/notebook/Training_coco_vizwiz_combined.ipynb"
    assert base_images(job) == ["nvcr.io/nvidia/pytorch:19.07-py3"]


# ----------------------------------------------------------------- seed 003: DINO


def test_dino_runs_on_one_gpu_and_resumes_from_a_checkpoint():
    job = load("dino.yaml")
    assert (job.spec.nodes, job.spec.gpus_per_node) == (1, 1)
    fresh = command(job)
    assert after(fresh, "--coco_path") == "/data/coco2017" and after(fresh, "--output_dir") == f"{RUN_DIR}/checkpoints"
    assert after(fresh, "-c") == "config/DINO/DINO_4scale.py"
    assert fresh[-2:] == ["--resume", ""]  # DINO's default: no checkpoint
    earlier = "/data/trainrig/runs/r-0/checkpoints/checkpoint.pth"
    assert command(job, resume_from=earlier)[-2:] == ["--resume", earlier]
    options = fresh[fresh.index("--options") + 1 : fresh.index("--resume")]
    assert {"num_classes=91", "lr=0.0001", "batch_size=2", "epochs=12"} <= set(options)


# ----------------------------------------------------------------- seed 002: DermAID


def test_dermaid_keeps_its_keys_secret():
    job = load("dermaid.yaml")
    spec = job.spec
    assert spec.secrets[0] == "WANDB_API_KEY" and "GIT_LOGIN" in spec.secrets
    assert not {"WANDB_API_KEY", "GIT_LOGIN"} & {*spec.env, *spec.env_from_host}
    argv = mpirun(job, gpu_count=4)
    for name in ("WANDB_API_KEY", "GIT_LOGIN"):
        assert argv[argv.index(name) - 1] == "-x"  # named, never valued
    assert not any(re.search(r"(WANDB_API_KEY|GIT_LOGIN)=", arg) for arg in argv + docker_run(job, with_secrets=True))
    assert "/data1/dermaid/secrets:/secrets:ro" in docker_run(job)
    assert spec.env["GOOGLE_APPLICATION_CREDENTIALS"].startswith("/secrets/")


def test_dermaid_is_one_process_over_the_nodes_gpus():
    job = load("dermaid.yaml")
    # MirroredStrategy: one rank that drives 4 GPUs, not 4 ranks that each train a copy.
    assert (job.spec.nodes, job.spec.gpus_per_node) == (1, 1)
    assert command(job)[-2:] == ["-g", "4"]
    jobs.check_fits(job.spec, make_inventory(gpu_nodes=1, gpu_count=4))


# ----------------------------------------------------------------- every job


@pytest.mark.parametrize("mpi_major", [4, 5])
@pytest.mark.parametrize("path", EVERY_JOB, ids=lambda p: p.name)
def test_no_job_names_an_mca_parameter_twice(path, mpi_major):
    job = jobs.load(path)
    names = mca_names(mpirun(job, gpu_count=job.spec.gpus_per_node, mpi_major=mpi_major))
    assert len(names) == len(set(names)), "Open MPI refuses an MCA parameter given twice"


@pytest.mark.parametrize("path", EVERY_JOB, ids=lambda p: p.name)
def test_every_built_image_has_an_ssh_client(path):
    job = jobs.load(path)
    if job.build_context:  # pre-flight needs ssh in the image: mpirun reaches the other containers with it
        assert "openssh-client" in (job.build_context / job.spec.image.build.dockerfile).read_text()


@pytest.mark.parametrize("path", EVERY_JOB, ids=lambda p: p.name)
def test_the_readme_has_a_section_and_a_command_for_every_job(path):
    readme = (JOBS / "README.md").read_text()
    headings = re.findall(r"^## .*$", readme, flags=re.MULTILINE)
    assert any(path.name in heading for heading in headings), f"no '## ...{path.name}...' section"
    assert f"fab train --job training_jobs/{path.name}" in readme


# Lines in the format each trainer prints (values made up), and what the job's patterns make of them.
LOG_LINES = [
    (
        "openseq2seq-transformer.yaml",
        "*** Global step 1200: ***     Train loss: 4.5612 ",
        {"step": 1200, "loss": 4.5612},
    ),
    (
        "openseq2seq-transformer.yaml",
        "*** Epoch 0, global step 300: ***     Train loss: 7.0000 ",
        {"step": 300, "loss": 7.0},
    ),
    ("openseq2seq-transformer.yaml", "***     Validation loss: 3.2100 ", None),
    ("openseq2seq-transformer.yaml", "time per step = 0:00:1.700", None),
    (
        "dermaid.yaml",
        "57/57 [==============================] - 80s 1s/step - loss: 1.2345 - accuracy: 0.6000 - val_loss: 1.5",
        {"step": 57, "loss": 1.2345},
    ),
    ("dermaid.yaml", "10/57 -- loss: 0.98", {"step": 10, "loss": 0.98}),
    ("dermaid.yaml", "Epoch 3/10", None),
    (
        "dino.yaml",
        "[12/01 11:30:00.123]: Epoch: [1]  [  10/58633]  eta: 1 day, 6:43:29  lr: 0.000100  class_error: 100.00  "
        "loss: 35.3826 (35.9012)  loss_bbox: 1.2000 (1.3000)  time: 1.8869  data: 0.6130  max mem: 6400",
        {"step": 10, "loss": 35.3826},
    ),
    ("dino.yaml", "Test:  [  10/5000]  eta: 0:10:00  class_error: 0.00  loss: 12.0000 (12.1000)", None),
    (
        "mxnet-resnet152.yaml",
        "INFO:root:Epoch[0] Batch [20-40]\tSpeed: 4630.42 samples/sec\taccuracy=0.001200",
        {"step": 40, "throughput": 4630.42},
    ),
    ("show-attend-tell.yaml", "0         3.912345    3.456789    0.123456     06:01", {"step": 0, "loss": 3.912345}),
    ("show-attend-tell.yaml", "12        2.100000    2.300000    0.210000     1:02:03", {"step": 12, "loss": 2.1}),
    ("show-attend-tell.yaml", "epoch     train_loss  valid_loss  bleu_metric  time", None),
    ("show-attend-tell.yaml", "0         #na#        00:42", None),
]


@pytest.mark.parametrize("file_name, line, expected", LOG_LINES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LOG_LINES)])
def test_metric_patterns_read_the_trainers_own_lines(file_name, line, expected):
    spec = load(file_name).spec
    patterns = {name: re.compile(pattern) for name, pattern in spec.metrics.model_dump().items()}
    assert supervisor.parse_metrics(line + "\n", patterns) == expected
