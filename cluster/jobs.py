"""Job specs: YAML validated into a strict model before anything runs, every error naming the file and the field.

A spec says what to run, not how to reach the nodes: the job's image (pulled, or built from a
Dockerfile beside the spec), the command and its container settings, the environment (literal
values, names passed through from the launching shell, and secrets read from it at launch),
and the MPI placement. cluster/launch.py turns it into container starts and one mpirun line.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.errors import TrainrigError
from infra.inventory import Inventory
from infra.models import Strict, first_error

PLACEHOLDERS = {
    "run_dir",
    "code_dir",
    "checkpoint_dir",
    "max_steps",
    "data_dir",
    "scratch_dir",
    "resume_from",
    "tensorboard_dir",
}
# What tensorboard.command may name: the event files, and where the server listens on the first node.
TENSORBOARD_PLACEHOLDERS = {"tensorboard_dir", "host", "port"}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names trainrig sets itself, or that Open MPI and PMIx read to wire ranks together.
RESERVED_ENV = re.compile(r"^(TRAINRIG_|OMPI_|PMIX_|PRTE_|OPAL_)")
# A backtracking bomb needs a quantified group that is itself quantified, e.g. (a+)+ or (\w*)*.
NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)[+*{]")
MAX_CODE_FILES = 2000
MAX_CODE_BYTES = 200 * 1024**2
SIZE = r"^[0-9]+[kmgKMG]?$"


EXTRA_METRIC = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


class MetricPatterns(Strict):
    """Regexes with one named group each, matched against every log line of the run.

    Beyond step, loss and throughput a job may name metrics of its own (`bleu: 'BLEU (?P<bleu>[0-9.]+)'`):
    each is a number in metrics.jsonl and a row of `fab monitor`.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    step: str = r"\bstep (?P<step>\d+)"
    loss: str = r"\bloss (?P<loss>[-+0-9.eE]+|nan|inf)"
    throughput: str = r"\bsamples/s (?P<throughput>[-+0-9.eE]+)"

    @property
    def extra(self) -> list[str]:
        """The names of the job's own metrics, in the order the spec gives them."""
        return list(self.model_extra or {})

    @model_validator(mode="after")
    def _compiles_with_group(self) -> MetricPatterns:
        for name in self.extra:
            if not EXTRA_METRIC.match(name) or name == "time":
                raise ValueError(f"metrics.{name}: a metric's name is lowercase letters, digits and '_' (not 'time')")
            if not isinstance((self.model_extra or {})[name], str):
                raise ValueError(f"metrics.{name}: give a regex with a named group (?P<{name}>...)")
        for name in ("step", "loss", "throughput", *self.extra):
            pattern = getattr(self, name)
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"metrics.{name}: not a valid regex ({exc})") from exc
            if name not in compiled.groupindex:
                raise ValueError(f"metrics.{name}: needs a named group (?P<{name}>...)")
            if NESTED_QUANTIFIER.search(pattern):
                raise ValueError(f"metrics.{name}: a repeated group inside a repetition can take forever to match")
        step = re.search(r"\(\?P<step>(.*?)\)", self.step)
        if step and not re.fullmatch(r"(\\d|\[0-9\])[+*]?|(\\d|\[0-9\])\{[0-9,]+\}", step.group(1)):
            raise ValueError(r"metrics.step: the step group must capture digits only, e.g. (?P<step>\d+)")
        return self


class ImageBuild(Strict):
    """An image built on the first node from a context folder beside the spec."""

    context: str = Field(description="folder with the Dockerfile, relative to the spec")
    dockerfile: str = "Dockerfile"
    args: dict[str, str] = {}


class Image(Strict):
    """Exactly one of: a reference to pull (optionally pinned: name@sha256:...), or a build.

    A private registry's login is the registry_login role's (fab provision), not the job's.
    """

    pull: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._/:-]*(@sha256:[0-9a-f]{64})?$")
    build: ImageBuild | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Image:
        if (self.pull is None) == (self.build is None):
            raise ValueError("give exactly one of pull (a reference) or build (a context folder)")
        return self


class Mount(Strict):
    source: str = Field(pattern=r"^/", description="path on the node")
    target: str = Field(pattern=r"^/", description="path in the container")
    read_only: bool = True


class Container(Strict):
    """How each node's container runs. Defaults follow NVIDIA's advice for NCCL."""

    shm_size: str = Field(default="1g", pattern=SIZE, description="/dev/shm size, unless ipc_host")
    ipc_host: bool = Field(default=False, description="share the host's IPC namespace (NCCL over shared memory)")
    ulimits: dict[str, str] = {"stack": "67108864"}
    mounts: list[Mount] = []
    workdir: str | None = Field(default=None, pattern=r"^/", description="default: the code folder, else the image's")
    user: str | None = Field(default=None, pattern=r"^[a-z0-9_][a-z0-9_.-]*(:[a-z0-9_][a-z0-9_.-]*)?$")

    @field_validator("ulimits")
    @classmethod
    def _ulimit_values(cls, ulimits: dict[str, str]) -> dict[str, str]:
        for name, value in ulimits.items():
            if not re.fullmatch(r"[a-z]+", name) or not re.fullmatch(r"-?[0-9]+(:-?[0-9]+)?", str(value)):
                raise ValueError(f"ulimit {name}={value}: use a name and a number (soft or soft:hard; -1 unlimited)")
        return ulimits


class Mpi(Strict):
    bind_to: str = Field(default="none", pattern=r"^(none|core|socket|numa|hwthread)$")
    map_by: str = Field(default="slot", pattern=r"^[a-z0-9:=,]+$")
    mca: dict[str, str] = Field(default={}, description="extra --mca parameters, name: value")

    @field_validator("mca")
    @classmethod
    def _mca_names(cls, mca: dict[str, str]) -> dict[str, str]:
        bad = [k for k in mca if not re.fullmatch(r"[a-z0-9_]+", k)]
        if bad:
            raise ValueError(f"not MCA parameter names: {', '.join(bad)}")
        return mca


class Health(Strict):
    """When the supervisor on the cluster gives up on a run, and how often it looks."""

    stall_timeout: int = Field(default=900, ge=10, description="seconds without a new step before the run is stalled")
    startup_grace: int = Field(default=900, ge=0, description="seconds allowed before the first step")
    node_check_every: int = Field(default=10, ge=2, le=300, description="seconds between checks of every node")


def _inside_run_dir(value: str) -> str:
    if PurePosixPath(value).is_absolute() or ".." in PurePosixPath(value).parts:
        raise ValueError("must be a path inside the run directory (relative, no '..')")
    return value


class TensorBoard(Strict):
    """Where the job writes TensorBoard event files, and the command in its image that serves them (fab tensorboard).

    The server runs in the job's image on the first node of the run and must listen on {host}
    (127.0.0.1) at {port}: fab tensorboard reaches it through an SSH tunnel and refuses one
    that listens on any other address.
    """

    logdir: str = Field(default="tensorboard", description="inside the run directory; {tensorboard_dir} in command")
    command: list[str] = Field(
        default=["tensorboard", "--logdir", "{tensorboard_dir}", "--host", "{host}", "--port", "{port}"],
        min_length=1,
    )

    @field_validator("logdir")
    @classmethod
    def _relative(cls, value: str) -> str:
        return _inside_run_dir(value)

    @field_validator("command")
    @classmethod
    def _serves_on_the_port(cls, command: list[str]) -> list[str]:
        named = {f for arg in command for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
        unknown = named - TENSORBOARD_PLACEHOLDERS
        if unknown:
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}; use {sorted(TENSORBOARD_PLACEHOLDERS)}")
        if not {"host", "port"} <= named:
            raise ValueError("must listen on {host} and {port}, which fab tensorboard picks")
        return command


class JobSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    description: str = ""
    image: Image
    code: str | None = Field(default=None, description="folder beside the spec, copied into the run")
    command: list[str] = Field(min_length=1)
    nodes: int = Field(ge=1, le=1024)
    gpus_per_node: int = Field(default=1, ge=1, le=16, description="ranks per node (one per GPU)")
    container: Container = Container()
    env: dict[str, str] = {}
    env_from_host: list[str] = Field(default=[], description="names passed through from the launching environment")
    secrets: list[str] = Field(default=[], description="names read from the launching environment; never written")
    mpi: Mpi = Mpi()
    health: Health = Health()
    max_steps: int | None = Field(default=None, ge=1)
    checkpoint_dir: str = "checkpoints"
    metrics: MetricPatterns = MetricPatterns()
    tensorboard: TensorBoard | None = Field(default=None, description="event files and their server (fab tensorboard)")

    @field_validator("env")
    @classmethod
    def _env_values(cls, env: dict[str, str]) -> dict[str, str]:
        _check_names(list(env))
        multi = [k for k, v in env.items() if "\n" in str(v) or "\r" in str(v) or "\0" in str(v)]
        if multi:
            raise ValueError(f"values of {', '.join(multi)} hold a line break; give each variable one line")
        return env

    @field_validator("env_from_host", "secrets")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        _check_names(names)
        return names

    @field_validator("checkpoint_dir")
    @classmethod
    def _relative(cls, value: str) -> str:
        return _inside_run_dir(value)

    @field_validator("command")
    @classmethod
    def _known_placeholders(cls, command: list[str]) -> list[str]:
        for arg in command:
            for _, field, _, _ in string.Formatter().parse(arg):
                if field is not None and field not in PLACEHOLDERS:
                    raise ValueError(f"unknown placeholder {{{field}}}; use one of {sorted(PLACEHOLDERS)}")
        return command

    @model_validator(mode="after")
    def _each_name_once(self) -> JobSpec:
        names = [*self.env, *self.env_from_host, *self.secrets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given more than once across env, env_from_host and secrets")
        return self

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


def _check_names(names: list[str]) -> None:
    bad = [k for k in names if not ENV_NAME.match(k)]
    if bad:
        raise ValueError(f"not valid environment variable names: {', '.join(bad)}")
    reserved = [k for k in names if RESERVED_ENV.match(k)]
    if reserved:
        raise ValueError(
            f"{', '.join(reserved)}: names starting TRAINRIG_, OMPI_, PMIX_, PRTE_ or OPAL_ are set by "
            "trainrig and Open MPI; rename them"
        )


class LoadedJob(BaseModel):
    """A spec plus where it came from (code and build paths are relative to the spec file)."""

    model_config = ConfigDict(frozen=True)
    spec: JobSpec
    path: Path

    @property
    def code_path(self) -> Path | None:
        return (self.path.parent / self.spec.code).resolve() if self.spec.code else None

    @property
    def build_context(self) -> Path | None:
        build = self.spec.image.build
        return (self.path.parent / build.context).resolve() if build else None


def load(path: str | Path) -> LoadedJob:
    """Read and validate a job file; every problem is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise TrainrigError(f"job file {path} does not exist; the examples live in training_jobs/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TrainrigError(f"{path}: not valid YAML{where}") from exc
    if not isinstance(data, dict):
        raise TrainrigError(f"{path}: expected a mapping of job settings, got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise TrainrigError(f"{path}: {first_error(exc)}") from exc
    job = LoadedJob(spec=spec, path=path.resolve())
    if job.code_path:
        check_folder(path, "code", job.code_path)
    if job.build_context:
        check_folder(path, "image.build.context", job.build_context)
        dockerfile = job.build_context / spec.image.build.dockerfile  # type: ignore[union-attr]
        if not dockerfile.resolve().is_relative_to(job.build_context) or not dockerfile.is_file():
            raise TrainrigError(f"{path}: image.build.dockerfile: {dockerfile} is not a file inside the context")
    return job


def check_folder(spec_path: Path, field: str, folder: Path) -> None:
    """A folder the job uploads: inside the spec's own folder, no link leading out, bounded in size.

    Whatever is named here is copied to the shared storage of a cluster, so a typo or a hostile
    spec must not reach the operator's keys or /etc.
    """
    home = spec_path.resolve().parent
    if not folder.is_relative_to(home):
        raise TrainrigError(
            f"{spec_path}: {field}: {folder} is outside the spec's folder {home}; keep it beside the spec"
        )
    if not folder.is_dir():
        raise TrainrigError(f"{spec_path}: {field}: directory {folder} does not exist")
    count = size = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = Path(root) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(folder):
                raise TrainrigError(f"{spec_path}: {field}: {entry} links outside the folder; copy the file in instead")
        for name in files:
            count += 1
            size += (Path(root) / name).stat().st_size
    if count > MAX_CODE_FILES or size > MAX_CODE_BYTES:
        raise TrainrigError(
            f"{spec_path}: {field}: {count} files, {size / 1024**2:.0f} MB; at most {MAX_CODE_FILES} "
            f"files and {MAX_CODE_BYTES // 1024**2} MB: put data on the shared storage, not in the job"
        )


def check_fits(spec: JobSpec, inv: Inventory) -> None:
    """Cross-check a spec against the cluster it is about to run on."""
    gpu_nodes = inv.gpu_nodes
    if spec.nodes > len(gpu_nodes):
        raise TrainrigError(
            f"job {spec.name!r} asks for {spec.nodes} nodes but cluster {inv.cluster!r} has {len(gpu_nodes)} GPU "
            f"nodes; lower `nodes` or recreate the cluster with more (fab up --nodes {spec.nodes})"
        )
    short = [n for n in gpu_nodes[: spec.nodes] if n.gpu_count and n.gpu_count < spec.gpus_per_node]
    if short:
        node = short[0]
        raise TrainrigError(
            f"{node.name}: job {spec.name!r} starts {spec.gpus_per_node} ranks per node but {node.name} has "
            f"{node.gpu_count} GPU(s); set gpus_per_node to at most {node.gpu_count}"
        )


def launch_environment(spec: JobSpec, environ: Mapping[str, str] = os.environ) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, secret) values from the launching environment; a missing name is an error before anything starts."""
    missing = [n for n in [*spec.env_from_host, *spec.secrets] if n not in environ]
    if missing:
        kind = "secret" if missing[0] in spec.secrets else "variable"
        raise TrainrigError(
            f"job {spec.name!r} needs the {kind} {missing[0]} from your environment; "
            f"export {missing[0]}=... and run fab train again"
        )
    secret_lines = [n for n in spec.secrets if "\n" in environ[n] or "\0" in environ[n]]
    if secret_lines:
        raise TrainrigError(f"secret {secret_lines[0]} holds a line break; trainrig passes secrets as one line each")
    return {n: environ[n] for n in spec.env_from_host}, {n: environ[n] for n in spec.secrets}


def substitute(spec: JobSpec, values: Mapping[str, str]) -> list[str]:
    return [arg.format_map(values) for arg in spec.command]
