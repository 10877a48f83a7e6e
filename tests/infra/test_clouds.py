"""Every registered cloud provides the whole interface, and nothing outside infra/clouds/ keeps a list of clouds."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml

from infra import catalog, clouds, config
from tests.infra.conftest import ROOT, STACKS

BACKEND_VERBS = ("create", "wait_ready", "describe", "destroy", "billable", "park", "resume", "bake")
CLOUD_VERBS = ("build", "backend", "billable", "power", "verify", "capture", "stand_in_image")


def test_the_registry_finds_the_clouds_without_a_list():
    assert clouds.names() == sorted(
        p.name for p in (ROOT / "infra" / "clouds").iterdir() if (p / "__init__.py").is_file()
    )
    assert clouds.DEFAULT in clouds.names()


@pytest.mark.parametrize("name", clouds.names())
def test_every_cloud_provides_the_whole_interface(name):
    cloud = clouds.get(name)
    assert cloud.name == name
    assert issubclass(cloud.Config, config.StackBase)
    assert typing.get_args(cloud.Config.model_fields["cloud"].annotation) == (name,)
    assert cloud.capabilities <= clouds.CAPABILITIES, cloud.capabilities - clouds.CAPABILITIES
    for verb in CLOUD_VERBS:
        assert callable(getattr(cloud, verb)), verb
    backend = cloud.backend("some-stack")
    for verb in BACKEND_VERBS:
        assert callable(getattr(backend, verb)), verb
    prices = catalog.load(name)
    assert prices.as_of and prices.source
    assert all(m.cpus >= 1 for m in prices.machines.values())
    stacks = [p for p in STACKS if yaml.safe_load(p.read_text())["config"]["trainrig:cloud"] == name]
    assert stacks, f"no sample stack in stacks/ for {name}"


def test_an_unknown_cloud_is_one_line():
    with pytest.raises(Exception, match=r"^cloud 'gcp' is not supported; choose one of: aws, ibm, local$"):
        clouds.get("gcp")


def test_a_capability_a_cloud_lacks_fails_early_with_the_reason():
    with pytest.raises(Exception, match=r"^aws clusters cannot be created by fab up"):
        clouds.require(clouds.get("aws"), "create", "be created by fab up: make them with pulumi up --stack NAME")


def test_no_module_outside_infra_clouds_names_a_cloud():
    named = re.compile(r"""["']({})["']""".format("|".join(clouds.names())))
    sources = [*Path(ROOT, "infra").glob("*.py"), *Path(ROOT, "cluster").rglob("*.py")]
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if named.search(line) and not line.lstrip().startswith(("#", '"""'))
    ]
    # The registry's DEFAULT is the one place a cloud is named outside its own package.
    assert offenders == []


def test_infra_never_imports_cluster():
    importing = [
        str(p.relative_to(ROOT))
        for p in Path(ROOT, "infra").rglob("*.py")
        if re.search(r"^\s*(from|import) cluster\b", p.read_text(), re.M)
    ]
    assert importing == []
