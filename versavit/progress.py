"""Rich progress bars for long work (rendering, reading, labelling, training)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console) as progress:
        yield progress


def per_name(bar: Progress, verb: str) -> Callable[[str, int, int], None]:
    """A `(name, done, total)` callback that keeps one bar per name (e.g. per split)."""
    ids: dict[str, int] = {}

    def report(name: str, done: int, total: int) -> None:
        if name not in ids:
            ids[name] = bar.add_task(f"{verb} {name}", total=total)
        bar.update(ids[name], completed=done)

    return report
