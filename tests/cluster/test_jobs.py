"""Job specs: validation cases from YAML, the repository's own examples, and the mpirun line."""

from pathlib import Path

import pytest
import yaml

from cluster import jobs
from infra.errors import TrainrigError
from tests.helpers import make_inventory

ROOT = Path(__file__).resolve().parents[2]
IMAGE = {"pull": "debian:bookworm-slim"}
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
    path = write_spec(tmp_path, {"name": "x", "image": IMAGE, "command": ["a"], "nodes": 1, "code": "missing"})
    with pytest.raises(TrainrigError, match="code: directory .*missing does not exist"):
        jobs.load(path)


def spec_of(**fields) -> jobs.JobSpec:
    return jobs.JobSpec.model_validate({"name": "j", "image": IMAGE, "command": ["a"], "nodes": 1, **fields})


def test_more_nodes_than_the_cluster_has():
    with pytest.raises(TrainrigError, match=r"asks for 3 nodes but cluster 'unit' has 2 GPU nodes"):
        jobs.check_fits(spec_of(nodes=3), make_inventory(gpu_nodes=2))


def test_more_ranks_per_node_than_gpus_names_the_host():
    spec = spec_of(gpus_per_node=4)
    with pytest.raises(
        TrainrigError,
        match=r"^node0: job 'j' starts 4 ranks per node but node0 has 2 GPU\(s\); "
        r"set gpus_per_node to at most 2$",
    ):
        jobs.check_fits(spec, make_inventory(gpu_nodes=2, gpu_count=2))
    jobs.check_fits(spec, make_inventory(gpu_nodes=2, gpu_count=0))  # CPU-only nodes: ranks are processes


def test_secrets_and_passed_variables_come_from_the_launching_environment():
    spec = spec_of(env_from_host=["LD_LIBRARY_PATH"], secrets=["WANDB_API_KEY"])
    plain, secret = jobs.launch_environment(spec, {"LD_LIBRARY_PATH": "/usr/local/cuda", "WANDB_API_KEY": "k"})
    assert plain == {"LD_LIBRARY_PATH": "/usr/local/cuda"} and secret == {"WANDB_API_KEY": "k"}
    with pytest.raises(TrainrigError, match=r"needs the secret WANDB_API_KEY from your environment; export "):
        jobs.launch_environment(spec, {"LD_LIBRARY_PATH": "/x"})
    with pytest.raises(TrainrigError, match=r"needs the variable LD_LIBRARY_PATH"):
        jobs.launch_environment(spec, {"WANDB_API_KEY": "k"})


def test_code_outside_the_spec_folder_is_refused(tmp_path):
    (tmp_path / "jobs").mkdir()
    path = write_spec(tmp_path / "jobs", {"name": "x", "image": IMAGE, "command": ["a"], "nodes": 1, "code": "../.."})
    with pytest.raises(TrainrigError, match=r"code: .* is outside the spec's folder"):
        jobs.load(path)


def test_a_link_out_of_the_code_folder_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "key").symlink_to(tmp_path.parent)
    path = write_spec(tmp_path, {"name": "x", "image": IMAGE, "command": ["a"], "nodes": 1, "code": "src"})
    with pytest.raises(TrainrigError, match=r"src/key links outside the folder; copy the file in instead"):
        jobs.load(path)


def test_a_huge_code_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"f{i}").write_text("x")
    monkeypatch.setattr(jobs, "MAX_CODE_FILES", 3)
    path = write_spec(tmp_path, {"name": "x", "image": IMAGE, "command": ["a"], "nodes": 1, "code": "src"})
    with pytest.raises(TrainrigError, match=r"4 files, 0 MB; at most 3 files"):
        jobs.load(path)


def test_a_build_needs_its_dockerfile_inside_the_context(tmp_path):
    (tmp_path / "ctx").mkdir()
    spec = {
        "name": "x",
        "image": {"build": {"context": "ctx", "dockerfile": "../Dockerfile"}},
        "command": ["a"],
        "nodes": 1,
    }
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(TrainrigError, match=r"image.build.dockerfile: .* is not a file inside the context"):
        jobs.load(write_spec(tmp_path, spec))
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\n")
    spec["image"]["build"]["dockerfile"] = "Dockerfile"
    assert jobs.load(write_spec(tmp_path, spec)).build_context == (tmp_path / "ctx").resolve()


def test_a_run_on_a_sudo_login_is_refused_before_anything_is_made():
    from cluster import runs

    inv = make_inventory(gpu_nodes=2, user="ubuntu")  # its node addresses answer nothing: no SSH is tried
    with pytest.raises(TrainrigError, match=r"logs in as 'ubuntu'; runs need the root login: remove trainrig:ssh_user"):
        runs.launch(inv, jobs.load(ROOT / "training_jobs" / "dp-mlp.yaml"))


def test_a_missing_secret_is_refused_before_anything_is_made():
    from cluster import runs

    job = jobs.load(ROOT / "training_jobs" / "dermaid.yaml")
    with pytest.raises(TrainrigError, match=r"needs the secret WANDB_API_KEY"):
        runs.launch(make_inventory(gpu_nodes=1, gpu_count=4), job, environ={})
