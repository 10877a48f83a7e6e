"""Job specs: validation cases from YAML, the repository's own examples, and the mpirun line."""

from pathlib import Path

import pytest
import yaml

from cluster import jobs
from infra.errors import TrainrigError
from tests.helpers import make_inventory

ROOT = Path(__file__).resolve().parents[2]
CASES = yaml.safe_load((Path(__file__).parent / "cases" / "job_specs.yaml").read_text())


def write_spec(tmp_path, spec) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_spec_cases(tmp_path, case):
    path = write_spec(tmp_path, case["spec"])
    if case.get("ok"):
        assert jobs.load(path).spec.name == case["spec"]["name"]
        return
    with pytest.raises(TrainrigError) as err:
        jobs.load(path)
    message = str(err.value)
    assert case["error"] in message
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("path", sorted((ROOT / "training_jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_loads(path):
    job = jobs.load(path)
    assert job.code_path is None or job.code_path.is_dir()


def test_missing_file_says_where_examples_are(tmp_path):
    with pytest.raises(TrainrigError, match=r"does not exist; the examples live in training_jobs/"):
        jobs.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: [unclosed", "not valid YAML at line 1"),
        ("- a\n- b\n", "expected a mapping of job settings, got list"),
    ],
)
def test_malformed_yaml(tmp_path, text, expected):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(TrainrigError, match=expected):
        jobs.load(path)


def test_code_directory_must_exist(tmp_path):
    path = write_spec(tmp_path, {"name": "x", "command": ["a"], "nodes": 1, "code": "missing"})
    with pytest.raises(TrainrigError, match="code: directory .*missing does not exist"):
        jobs.load(path)


def test_more_nodes_than_the_cluster_has():
    spec = jobs.JobSpec(name="big", command=["a"], nodes=3)
    with pytest.raises(TrainrigError, match=r"asks for 3 nodes but cluster 'unit' has 2 GPU nodes"):
        jobs.check_fits(spec, make_inventory(gpu_nodes=2))


def test_more_gpus_per_node_than_the_nodes_have():
    spec = jobs.JobSpec(name="big", command=["a"], nodes=1, gpus_per_node=4)
    with pytest.raises(TrainrigError, match="asks for 4 GPUs per node but node0 have fewer"):
        jobs.check_fits(spec, make_inventory(gpu_nodes=2, gpu_count=2))
    jobs.check_fits(spec, make_inventory(gpu_nodes=2, gpu_count=0))  # CPU-only nodes: ranks are processes


def test_mpirun_line():
    spec = jobs.JobSpec(
        name="j",
        code="src",
        command=["python3", "train.py", "--steps", "{max_steps}", "--ck", "{checkpoint_dir}"],
        nodes=2,
        gpus_per_node=2,
        env={"NCCL_DEBUG": "INFO"},
        max_steps=50,
    )
    argv = jobs.mpirun_argv(spec, make_inventory(gpu_nodes=3), "/data/runs/r1")
    assert argv == [
        "mpirun",
        "--allow-run-as-root",
        "-np",
        "4",
        "-H",
        "node0:2,node1:2",
        "--bind-to",
        "none",
        "--map-by",
        "slot",
        "--wdir",
        "/data/runs/r1/code",
        "--mca",
        "btl_tcp_if_include",
        "10.9.0.0/24",
        "--mca",
        "oob_tcp_if_include",
        "10.9.0.0/24",
        "-x",
        "TRAINRIG_RUN_DIR=/data/runs/r1",
        "-x",
        "TRAINRIG_CHECKPOINT_DIR=/data/runs/r1/checkpoints",
        "-x",
        "PYTHONUNBUFFERED=1",
        "-x",
        "NCCL_DEBUG=INFO",
        "python3",
        "train.py",
        "--steps",
        "50",
        "--ck",
        "/data/runs/r1/checkpoints",
    ]


def test_arguments_stay_single_arguments():
    # A value with spaces or shell characters is one argv element, never re-split.
    spec = jobs.JobSpec(name="j", command=["echo", "a b; rm -rf /", "{run_dir}"], nodes=1)
    argv = jobs.mpirun_argv(spec, make_inventory(gpu_nodes=1), "/d/r")
    assert argv[-3:] == ["echo", "a b; rm -rf /", "/d/r"]
    assert argv[:2] == ["mpirun", "--allow-run-as-root"]  # ranks run under a root system unit


def test_a_run_on_a_sudo_login_is_refused_before_anything_is_made():
    from cluster import runs

    inv = make_inventory(gpu_nodes=2, user="ubuntu")  # its node addresses answer nothing: no SSH is tried
    with pytest.raises(TrainrigError, match=r"logs in as 'ubuntu'; runs need the root login: remove trainrig:ssh_user"):
        runs.launch(inv, jobs.load(ROOT / "training_jobs" / "dp-mlp.yaml"))
