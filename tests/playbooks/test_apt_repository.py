"""apt_proxy's repository task file, run locally: an HTTPS repository through the cluster's
package cache (a mirror list, the cache first and the repository second) or directly."""

import datetime
import functools
import http.server
import shutil
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


# -- apt itself, against a stand-in HTTPS repository and a stand-in cache, all on loopback ------


class _Repository(http.server.SimpleHTTPRequestHandler):
    """The HTTPS repository: serves its folder; records each request and whether the cache made it."""

    hits: list[tuple[str, bool]]

    def do_GET(self):
        type(self).hits.append((self.path, self.headers.get("Via") == "stand-in-cache"))
        super().do_GET()

    def log_message(self, *args):
        pass


class _Cache(http.server.BaseHTTPRequestHandler):
    """apt-cacher-ng's part: a proxy that turns http://HTTPS///host/path into https://host/path."""

    hits: list[str]
    context: ssl.SSLContext

    def do_GET(self):
        type(self).hits.append(self.path)
        assert self.path.startswith("http://HTTPS///"), self.path
        upstream = "https://" + self.path.removeprefix("http://HTTPS///")
        try:
            request = urllib.request.Request(upstream, headers={"Via": "stand-in-cache"})
            with urllib.request.urlopen(request, context=type(self).context, timeout=10) as reply:
                body, status = reply.read(), reply.status
        except urllib.error.HTTPError as error:
            body, status = b"", error.code
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "repo.crt", tmp_path / "repo.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _serve(server: http.server.HTTPServer) -> http.server.HTTPServer:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian or Ubuntu), as the nodes have")
def test_apt_reads_the_repository_through_the_cache_and_directly_when_the_cache_is_down(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Packages").write_text(
        "Package: trainrig-stand-in\nVersion: 1.0\nArchitecture: all\nFilename: ./trainrig-stand-in_1.0_all.deb\n"
        "Size: 1\nDescription: a package of the stand-in repository\n\n"
    )
    cert, key = _certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    repository = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Repository, directory=str(repo)))
    repository.socket = tls.wrap_socket(repository.socket, server_side=True)
    _Repository.hits, _Cache.hits = [], []
    _Cache.context = ssl.create_default_context(cafile=str(cert))
    cache = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Cache)
    _serve(repository)
    _serve(cache)
    try:
        # apt_proxy as it is on a GPU node: the script that picks the cache or DIRECT, then the source.
        detect, config = tmp_path / "apt-proxy", tmp_path / "01trainrig-proxy"
        cache_address = f"127.0.0.1:{cache.server_address[1]}"
        common = {"apt_proxy_cache": cache_address, "apt_proxy_detect_script": str(detect)}
        run_tasks(tmp_path, "apt_proxy", "main", {}, {**common, "apt_proxy_config_file": str(config)})
        sources = tmp_path / "sources.list.d"
        sources.mkdir()
        run_tasks(
            tmp_path,
            "apt_proxy",
            "repository",
            {},
            {
                **common,
                "apt_proxy_mirrors_dir": str(tmp_path / "mirrors"),
                "apt_proxy_repo_name": "stand-in",
                "apt_proxy_repo_url": f"https://localhost:{repository.server_address[1]}/",
                "apt_proxy_repo_arch": "amd64",
                "apt_proxy_repo_signed_by": "/nonexistent.gpg",
                "apt_proxy_repo_source_file": str(sources / "stand-in.list"),
            },
        )
        # The stand-in repository is unsigned: trusted=yes stands in for the key (apt's signature
        # check is apt's own, and the same whichever mirror answered).
        source = (sources / "stand-in.list").read_text().replace("[signed-by=/nonexistent.gpg]", "[trusted=yes]")
        (sources / "stand-in.list").write_text(source)
        state = tmp_path / "apt"
        for folder in ("lists/partial", "archives/partial"):
            (state / folder).mkdir(parents=True)
        (state / "status").touch()
        apt_options = [
            f"Dir::Etc::SourceList={tmp_path / 'none.list'}",
            f"Dir::Etc::SourceParts={sources}",
            f"Dir::Etc::Parts={tmp_path / 'none.d'}",
            f"Dir::State={state}",
            f"Dir::State::status={state / 'status'}",
            f"Dir::Cache={state}",
            f"Acquire::http::Proxy-Auto-Detect={detect}",
            f"Acquire::https::CaInfo={cert}",
            "Debug::NoLocking=1",
            "APT::Sandbox::User=root",  # apt's own downloader may read this test's private files
            # apt retries a failed mirror with a growing delay before the next one (about 20 s
            # in all); the order of mirrors, not the wait, is what is under test.
            "Acquire::Retries=0",
        ]

        def candidate() -> str:
            for folder in (state / "lists").glob("*Packages"):
                folder.unlink()
            argv = ["apt-get", "update", "-q"] + [arg for option in apt_options for arg in ("-o", option)]
            update = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert update.returncode == 0, update.stdout + update.stderr
            policy = subprocess.run(
                ["apt-cache", "policy", "trainrig-stand-in"] + [a for o in apt_options for a in ("-o", o)],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            return policy.split("Candidate:")[1].split()[0]

        # The cache answers: apt asks it, in plain HTTP, and the cache fetches from the repository.
        assert candidate() == "1.0"
        assert f"http://HTTPS///localhost:{repository.server_address[1]}/Packages" in _Cache.hits
        assert ("/Packages", True) in _Repository.hits and ("/Packages", False) not in _Repository.hits
        # The cache is down: apt goes to the repository itself.
        cache.shutdown()
        cache.server_close()
        _Cache.hits.clear()
        _Repository.hits.clear()
        assert candidate() == "1.0"
        assert _Cache.hits == [] and ("/Packages", False) in _Repository.hits
    finally:
        repository.shutdown()
        repository.server_close()
