"""Terminal output: text from nodes and tools is shown as it is, never parsed as markup."""

import io

import pytest
from rich.console import Console

from infra import ui

LINE = "E: Could not get lock [/var/lib/apt/lists/lock]. It is held by process 4121 [bold]"


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_line_with_brackets_is_shown_as_text(monkeypatch, terminal):
    out = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=out, force_terminal=terminal, width=200))
    monkeypatch.setattr(ui, "PLAIN_EVERY", 0.0)
    with ui.status("pulumi up of demo") as show:
        show(LINE)
    assert "[/var/lib/apt/lists/lock]" in out.getvalue()


def test_a_node_board_shows_escaped_node_text(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=out, force_terminal=False, width=200))
    with ui.NodeBoard("provisioning", ["node0"]) as board:
        board.update("node0", f"[red]failed[/]: {ui.plain(LINE)}")
    assert "It is held by process 4121 [bold]" in out.getvalue()
