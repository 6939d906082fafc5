"""One progress bar style for long work (rich), silent when asked or when output is not a terminal."""
from __future__ import annotations

from typing import Iterable, Iterator, Sized, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, *, show: bool = True, total: int | None = None) -> Iterator[T]:
    """Yield from `items` while drawing a transient bar on stderr."""
    if not show:
        yield from items
        return
    total = total if total is not None else (len(items) if isinstance(items, Sized) else None)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
