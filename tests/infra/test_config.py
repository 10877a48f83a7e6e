"""Stack configuration: every sample stack validates and prices; bad input is one line naming the key (cases: data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from infra import blueprint, catalog, clouds, config
from infra.errors import TrainrigError
from tests.infra.conftest import ROOT, STACKS

CASES = yaml.safe_load((Path(__file__).parent / "cases" / "stack_config_errors.yaml").read_text())
CREDENTIALS = {
    "SL_USERNAME": "u",
    "SL_API_KEY": "k",
    "AWS_ACCESS_KEY_ID": "a",
    "AWS_SECRET_ACCESS_KEY": "b",
    "HOME": "/nonexistent",
}


@pytest.mark.parametrize("path", STACKS, ids=lambda p: p.stem)
def test_every_sample_stack_validates_and_prices(path):
    cfg = config.load_stack_file(path)
    cfg.check_credentials(CREDENTIALS)
    p = blueprint.blueprint(cfg)
    assert len(p.nodes) == cfg.gpu_nodes + (not cfg.shared_fs)  # EFS: no storage node
    assert p.total_usd_per_hour == pytest.approx(p.compute_usd_per_hour + p.storage_usd_per_hour)
    if cfg.cloud != "local":
        assert p.compute_usd_per_hour > 0 and p.storage_usd_per_hour > 0


def test_seed_clusters():
    dal10 = config.load_stack_file(config.stack_file("ibm-dal10-v100", ROOT))
    assert (dal10.datacenter, dal10.flavor, dal10.gpus, dal10.data_disk_gb, dal10.storage_disk_gb) == (
        "dal10",
        "AC2_8X60X100",
        1,
        2000,
        2000,
    )
    syd04 = config.load_stack_file(config.stack_file("ibm-syd04-dual-v100", ROOT))
    assert (syd04.datacenter, syd04.flavor, syd04.gpu_nodes, syd04.gpus, syd04.data_disk_gb) == (
        "syd04",
        "AC2_16X120X100",
        2,
        2,
        2000,
    )
    aws = config.load_stack_file(config.stack_file("aws-16-gpu", ROOT))
    assert (aws.gpu_nodes, aws.flavor, aws.gpus) == (16, "p3.16xlarge", 8)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["error"][:60])
def test_bad_config_is_one_line_naming_the_key(case, tmp_path):
    doc = yaml.safe_load(config.stack_file(case["base"], ROOT).read_text())
    for key, value in case["set"].items():
        if value is None:
            doc["config"].pop(f"trainrig:{key}", None)
        else:
            doc["config"][f"trainrig:{key}"] = value
    path = tmp_path / "Pulumi.case.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TrainrigError) as err:
        config.load_stack_file(path)
    message = str(err.value)
    assert message.startswith(case["error"]), message
    assert "\n" not in message


def test_the_program_reads_the_same_keys_from_the_engine():
    doc = yaml.safe_load(config.stack_file("ibm-syd04-dual-v100", ROOT).read_text())["config"]
    engine = {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()}  # as the engine hands them over
    engine["trainrig:tags"] = '{"a": "b"}'
    cfg = config.from_pulumi_config({**engine, "aws:region": "ignored"})
    assert cfg.gpu_nodes == 2 and cfg.hourly is True and cfg.tags == {"a": "b"}


@pytest.mark.parametrize(
    "stack, env, error",
    [
        (
            "ibm-dal10-v100",
            {"HOME": "/nonexistent"},
            "SL_USERNAME/SL_API_KEY: IBM Cloud classic credentials are missing; export SL_USERNAME",
        ),
        (
            "aws-16-gpu",
            {"HOME": "/nonexistent"},
            "AWS_ACCESS_KEY_ID: AWS credentials are missing; export AWS_ACCESS_KEY_ID",
        ),
    ],
)
def test_missing_credentials(stack, env, error):
    with pytest.raises(TrainrigError, match=error):
        config.load_named(stack, ROOT, env)


def test_credentials_as_stack_secrets_are_enough(tmp_path):
    doc = yaml.safe_load(config.stack_file("ibm-dal10-v100", ROOT).read_text())
    doc["config"]["trainrig:sl_username"] = {"secure": "v1:abc"}
    doc["config"]["trainrig:sl_api_key"] = {"secure": "v1:def"}
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text(yaml.safe_dump(doc))
    config.load_named(str(path), ROOT, {"HOME": "/nonexistent"})


@pytest.mark.parametrize("cloud", clouds.names())
def test_every_cloud_has_a_dated_sourced_price_table(cloud):
    prices = catalog.load(cloud)
    assert prices.as_of.year >= 2024 and prices.currency == "USD" and prices.source


def test_price_tables_know_gpu_counts():
    assert catalog.load("ibm").machines["AC2_16X120X100"].gpus == 2
    assert catalog.load("aws").machines["p2.16xlarge"].gpus == 16


def test_a_typo_is_named_before_the_missing_key_it_explains(tmp_path):
    doc = yaml.safe_load(config.stack_file("local", ROOT).read_text())
    doc["config"]["trainrig:gpu_node"] = doc["config"].pop("trainrig:gpu_nodes")
    path = tmp_path / "Pulumi.typo.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TrainrigError, match=r"^trainrig:gpu_node: unknown key; remove it from the stack$"):
        config.load_stack_file(path)


def test_a_wide_admin_cidr_passes_only_when_the_stack_says_it_means_it(tmp_path):
    doc = yaml.safe_load(config.stack_file("ibm-dal10-v100", ROOT).read_text())
    doc["config"]["trainrig:admin_cidr"] = "0.0.0.0/1"
    doc["config"]["trainrig:admin_cidr_wide"] = True
    path = tmp_path / "Pulumi.wide.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert str(config.load_stack_file(path).admin_cidr) == "0.0.0.0/1"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c.__setitem__("trainrig:gpu_node", c.pop("trainrig:gpu_nodes")),
            "trainrig:gpu_node: unknown key; remove it from the stack",
        ),
        (lambda c: c.__setitem__("trainrig:cloud", "gcp"), "trainrig:cloud: unknown cloud 'gcp'"),
        (lambda c: c.__setitem__("trainrig:gpu_nodes", "many"), "trainrig:gpu_nodes: 'many': "),
    ],
)
def test_the_pulumi_program_fails_a_bad_stack_in_one_line_not_a_traceback(monkeypatch, change, message):
    """Under `pulumi up` the program's config error must be a RunError, which Pulumi prints as its message alone."""
    import runpy

    import pulumi

    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.aws-16-gpu.yaml").read_text())["config"]
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()}
    change(values)
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(values))
    with pytest.raises(pulumi.RunError) as err:
        runpy.run_path(str(ROOT / "infra" / "__main__.py"))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
