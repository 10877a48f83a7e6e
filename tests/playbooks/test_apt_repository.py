"""apt_proxy's repository task file, run locally: an HTTPS repository through the cluster's
package cache (a mirror list, the cache first and the repository second) or directly."""

from pathlib import Path

from tests.playbooks.local_role import run_tasks

URL = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)"
KEY = "/etc/apt/keyrings/nvidia-container-toolkit.asc"


def add(tmp_path: Path, cache: str) -> tuple[Path, Path]:
    mirrors, source = tmp_path / "mirrors", tmp_path / "sources.list.d" / "toolkit.list"
    source.parent.mkdir(exist_ok=True)
    run_tasks(
        tmp_path,
        "apt_proxy",
        "repository",
        {},
        {
            "apt_proxy_cache": cache,
            "apt_proxy_mirrors_dir": str(mirrors),
            "apt_proxy_repo_name": "toolkit",
            "apt_proxy_repo_url": URL,
            "apt_proxy_repo_arch": "amd64",
            "apt_proxy_repo_signed_by": KEY,
            "apt_proxy_repo_source_file": str(source),
        },
    )
    return mirrors / "toolkit.list", source


def test_an_https_repository_goes_through_the_cache_and_falls_back_to_itself(tmp_path):
    mirror_list, source = add(tmp_path, "10.9.0.12:3142")
    # The signature check stays: the key is named on the source line, whichever mirror answers.
    assert source.read_text() == f"deb [signed-by={KEY}] mirror+file:{mirror_list} /\n"
    mirrors = [line.split("\t") for line in mirror_list.read_text().splitlines() if not line.startswith("#")]
    assert mirrors == [
        # apt asks the cache in plain HTTP; apt-cacher-ng fetches the HTTPS upstream itself.
        ["http://HTTPS///nvidia.github.io/libnvidia-container/stable/deb/amd64", "priority:1"],
        # Tried when the first fails: the proxy script says DIRECT and "HTTPS" is no host.
        ["https://nvidia.github.io/libnvidia-container/stable/deb/amd64", "priority:2"],
    ]


def test_without_a_cache_the_repository_is_read_directly(tmp_path):
    mirror_list, source = add(tmp_path, "10.9.0.12:3142")
    # The cache went away (a cluster without a storage node): the mirror list goes too.
    add(tmp_path, "")
    assert not mirror_list.exists()
    direct = "https://nvidia.github.io/libnvidia-container/stable/deb/amd64"
    assert source.read_text() == f"deb [signed-by={KEY}] {direct} /\n"
