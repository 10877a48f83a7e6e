"""The one command runner: argument lists, deadlines, one-line errors."""

import pytest

from infra.commands import run, wait_until
from infra.errors import TrainrigError


def test_failure_names_what_and_last_line():
    with pytest.raises(TrainrigError, match="listing things failed: second"):
        run(["sh", "-c", "echo first >&2; echo second >&2; exit 3"], what="listing things")


def test_arguments_are_not_split_by_a_shell():
    assert run(["printf", "%s|", "a b", "$(id)"]).stdout == "a b|$(id)|"


def test_missing_program():
    with pytest.raises(TrainrigError, match="no-such-tool is not installed"):
        run(["no-such-tool"])


def test_timeout():
    with pytest.raises(TrainrigError, match="sleeping did not finish within 0s"):
        run(["sleep", "5"], timeout=0.2, what="sleeping")


def test_wait_until_deadline():
    with pytest.raises(TrainrigError, match="timed out after 0s waiting for the moon"):
        wait_until(lambda: False, timeout=0.1, interval=0.02, what="the moon")
    assert wait_until(lambda: 7, timeout=1, what="seven") == 7
