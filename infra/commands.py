"""One place runs local commands: argument lists, deadlines, logging, one-line errors."""

from __future__ import annotations

import logging
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from infra.errors import TrainrigError

log = logging.getLogger("trainrig.commands")
T = TypeVar("T")


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    input: bytes | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (never through a shell); on failure raise TrainrigError naming `what`."""
    argv = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(argv))
    try:
        raw = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        proc = subprocess.CompletedProcess(
            argv, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace")
        )
    except FileNotFoundError as exc:
        raise TrainrigError(f"{argv[0]} is not installed: {what or 'needed to continue'}") from exc
    except subprocess.TimeoutExpired as exc:
        raise TrainrigError(f"{what or argv[0]} did not finish within {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit status {proc.returncode}"
        raise TrainrigError(f"{what or shlex.join(argv[:3])} failed: {last}")
    return proc


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.5,
    what: str,
    error: TrainrigError | None = None,
) -> T:
    """Poll predicate until it returns something truthy; raise a clear error (or `error`) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise error or TrainrigError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stream(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    *,
    timeout: float,
    what: str,
) -> None:
    """Run argv, handing each output line to on_line as it comes (live progress on long work)."""
    argv = [str(a) for a in argv]
    log.debug("stream: %s", shlex.join(argv))
    deadline = time.monotonic() + timeout
    tail: list[str] = []
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except FileNotFoundError as exc:
        raise TrainrigError(f"{argv[0]} is not installed: needed for {what}") from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-5:]
            on_line(line)
            if time.monotonic() > deadline:
                proc.kill()
                raise TrainrigError(f"{what} did not finish within {timeout:.0f}s")
    if proc.returncode != 0:
        last = next((t for t in reversed(tail) if t.strip()), f"exit status {proc.returncode}")
        raise TrainrigError(f"{what} failed: {last}")
