"""Terminal output: one console, phases with timings, and live per-node status tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)


PLAIN_EVERY = 10.0


def plain(text: str) -> str:
    """Text from a node or a tool, shown as it is: brackets in it are not terminal markup."""
    return escape(text[:160])


@contextmanager
def status(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the latest output line; without a terminal (CI), that line every 10 s."""
    if not console.is_terminal:
        console.print(f"{message} ...")
        last = [time.monotonic()]

        def show(detail: str) -> None:
            if time.monotonic() - last[0] >= PLAIN_EVERY:
                last[0] = time.monotonic()
                console.print(f"  {message}: {plain(detail[:100])}")

        yield show
        return
    with console.status(message) as live:
        # Pulumi's and the nodes' lines are text: "[/var/lib/apt/lists/lock]" must not parse as markup.
        yield lambda detail: live.update(f"{message} [dim]{plain(detail[:100])}[/dim]")


@contextmanager
def timed(label: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    start = time.monotonic()
    console.print(f"[bold cyan]==>[/] [bold]{label}[/]")
    yield
    elapsed = time.monotonic() - start
    if timings is not None:
        timings[label] = elapsed
    console.print(f"[green]    {label} done in {elapsed:.1f}s[/]")


class NodeBoard:
    """A live table of what each node is doing, for work that runs on all nodes at once."""

    def __init__(self, title: str, nodes: list[str]):
        self.title = title
        self.rows = {n: "waiting" for n in nodes}
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=False)

    def _render(self) -> Table:
        table = Table(title=self.title, title_justify="left", show_edge=False)
        table.add_column("node")
        table.add_column("status")
        for node, text in self.rows.items():
            table.add_row(node, text)
        return table

    def update(self, node: str, text: str) -> None:
        self.rows[node] = text
        self.live.update(self._render())

    def __enter__(self) -> NodeBoard:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)
