"""The one progress/logging helper library code reports through (library code never prints).

Library functions call ``progress.task(...)`` and ``progress.log(...)``. By default these go to the
``nvfp4kit`` logger and nowhere visible; the CLI installs a rich renderer with :func:`use_rich`.

    with progress.task("calibrating", total=n) as t:
        for batch in batches:
            ...
            t.advance(1, loss=0.42)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Protocol

logger = logging.getLogger("nvfp4kit")


class Task(Protocol):
    def advance(self, n: float = 1, **fields) -> None: ...


class _LogTask:
    def __init__(self, description: str, total: float | None):
        self.description = description
        self.total = total
        self.done = 0.0

    def advance(self, n: float = 1, **fields) -> None:
        self.done += n
        if fields:
            logger.debug("%s %s/%s %s", self.description, self.done, self.total, fields)


class _Reporter:
    """Default reporter: standard logging only."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        logger.info("%s ...", description)
        t = _LogTask(description, total)
        yield t
        logger.info("%s done", description)

    def log(self, message: str) -> None:
        logger.info(message)

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        logger.info("%s\n%s", title, "\n".join("  ".join(str(c) for c in r) for r in [columns, *rows]))


class _RichReporter(_Reporter):
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=self.console, transient=False) as prog:
            tid = prog.add_task(description, total=total, info="")

            class _T:
                def advance(self, n: float = 1, **fields) -> None:
                    info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                    prog.update(tid, advance=n, info=info)

            yield _T()

    def log(self, message: str) -> None:
        self.console.print(message)

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        from rich.table import Table

        t = Table(title=title)
        for c in columns:
            t.add_column(str(c))
        for r in rows:
            t.add_row(*(str(c) for c in r))
        self.console.print(t)


_reporter: _Reporter = _Reporter()


def use_rich(console=None) -> None:
    """Render progress with rich (called by the CLI)."""
    global _reporter
    _reporter = _RichReporter(console)


def use_logging() -> None:
    global _reporter
    _reporter = _Reporter()


def task(description: str, total: float | None = None):
    """A context manager yielding an object with ``advance(n, **fields)``."""
    return _reporter.task(description, total)


def log(message: str) -> None:
    _reporter.log(message)


def table(title: str, columns: list[str], rows: list[list]) -> None:
    _reporter.table(title, columns, rows)
