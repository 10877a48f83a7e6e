"""Job specs: YAML validated into a strict model, and the one mpirun command line built from it."""

from __future__ import annotations

import re
import string
from pathlib import Path, PurePosixPath

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.errors import TrainrigError
from infra.inventory import Inventory
from infra.models import Strict, first_error

PLACEHOLDERS = {"run_dir", "code_dir", "checkpoint_dir", "max_steps"}


class MetricPatterns(Strict):
    """Regexes with one named group each, matched against every log line of the run."""

    step: str = r"\bstep (?P<step>\d+)"
    loss: str = r"\bloss (?P<loss>[-+0-9.eE]+|nan|inf)"
    throughput: str = r"\bsamples/s (?P<throughput>[-+0-9.eE]+)"

    @model_validator(mode="after")
    def _compiles_with_group(self) -> MetricPatterns:
        for name in ("step", "loss", "throughput"):
            pattern = getattr(self, name)
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"metrics.{name}: not a valid regex ({exc})") from exc
            if name not in compiled.groupindex:
                raise ValueError(f"metrics.{name}: needs a named group (?P<{name}>...)")
        return self


class JobSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    description: str = ""
    code: str | None = Field(default=None, description="directory beside the spec, copied into the run")
    command: list[str] = Field(min_length=1)
    nodes: int = Field(ge=1, le=1024)
    gpus_per_node: int = Field(default=1, ge=1, le=16, description="ranks per node (one per GPU)")
    env: dict[str, str] = {}
    max_steps: int | None = Field(default=None, ge=1)
    checkpoint_dir: str = "checkpoints"
    metrics: MetricPatterns = MetricPatterns()

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ValueError(f"not valid environment variable names: {', '.join(bad)}")
        return env

    @field_validator("checkpoint_dir")
    @classmethod
    def _relative(cls, value: str) -> str:
        if PurePosixPath(value).is_absolute() or ".." in PurePosixPath(value).parts:
            raise ValueError("must be a path inside the run directory (relative, no '..')")
        return value

    @field_validator("command")
    @classmethod
    def _known_placeholders(cls, command: list[str]) -> list[str]:
        for arg in command:
            for _, field, _, _ in string.Formatter().parse(arg):
                if field is not None and field not in PLACEHOLDERS:
                    raise ValueError(f"unknown placeholder {{{field}}}; use one of {sorted(PLACEHOLDERS)}")
        return command

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


class LoadedJob(BaseModel):
    """A spec plus where it came from (code paths are relative to the spec file)."""

    model_config = ConfigDict(frozen=True)
    spec: JobSpec
    path: Path

    @property
    def code_path(self) -> Path | None:
        return (self.path.parent / self.spec.code).resolve() if self.spec.code else None


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
    if job.code_path and not job.code_path.is_dir():
        raise TrainrigError(f"{path}: code: directory {job.code_path} does not exist")
    return job


def check_fits(spec: JobSpec, inv: Inventory) -> None:
    """Cross-check a spec against the cluster it is about to run on."""
    gpu_nodes = inv.gpu_nodes
    if spec.nodes > len(gpu_nodes):
        raise TrainrigError(
            f"job {spec.name!r} asks for {spec.nodes} nodes but cluster {inv.cluster!r} has {len(gpu_nodes)} GPU nodes;"
            " "
            f"lower `nodes` or recreate the cluster with more (fab up --nodes {spec.nodes})"
        )
    short = [n.name for n in gpu_nodes[: spec.nodes] if n.gpu_count and n.gpu_count < spec.gpus_per_node]
    if short:
        raise TrainrigError(
            f"job {spec.name!r} asks for {spec.gpus_per_node} GPUs per node but {', '.join(short)} have fewer"
        )


def substitute(spec: JobSpec, run_dir: str) -> list[str]:
    values = {
        "run_dir": run_dir,
        "code_dir": f"{run_dir}/code",
        "checkpoint_dir": f"{run_dir}/{spec.checkpoint_dir}",
        "max_steps": str(spec.max_steps or ""),
    }
    return [arg.format_map(values) for arg in spec.command]


def mpirun_argv(spec: JobSpec, inv: Inventory, run_dir: str) -> list[str]:
    """One mpirun line: ranks on the first `nodes` GPU nodes, MPI traffic on the private network."""
    nodes = inv.gpu_nodes[: spec.nodes]
    cidr = str(inv.network.cidr) if inv.network else None
    # The supervisor is a system unit, so mpirun is root whatever the login (runs.launch allows root only).
    argv = ["mpirun", "--allow-run-as-root"]
    argv += ["-np", str(spec.ranks), "-H", ",".join(f"{n.name}:{spec.gpus_per_node}" for n in nodes)]
    argv += ["--bind-to", "none", "--map-by", "slot", "--wdir", f"{run_dir}/code" if spec.code else run_dir]
    if cidr:
        argv += ["--mca", "btl_tcp_if_include", cidr, "--mca", "oob_tcp_if_include", cidr]
    env = {
        "TRAINRIG_RUN_DIR": run_dir,
        "TRAINRIG_CHECKPOINT_DIR": f"{run_dir}/{spec.checkpoint_dir}",
        "PYTHONUNBUFFERED": "1",
        **spec.env,
    }
    for key, value in env.items():
        argv += ["-x", f"{key}={value}"]
    return argv + substitute(spec, run_dir)
