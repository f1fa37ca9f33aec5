"""The one progress/logging helper library code reports through (library code never prints).

Library functions call ``progress.task(...)`` and ``progress.log(...)``. By default these go to the
``nvfp4kit`` logger and nowhere visible; the CLI installs :func:`use_terminal`: rich bars on a
terminal, plain timestamped lines (stage, done/total, rate, ETA, at most every ``interval`` seconds)
when the output goes to a file or a pipe, so a long run shows in its log.

    with progress.task("calibrating", total=n) as t:
        for batch in batches:
            ...
            t.advance(1, loss=0.42)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fields(fields: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


class _PlainTask:
    def __init__(self, reporter: "_LineReporter", description: str, total: float | None):
        self.r, self.description, self.total = reporter, description, total
        self.done = 0.0
        self.start = time.monotonic()
        self.last_line = self.start
        self.fields: dict = {}

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.description}: {self.done:g}" + (f"/{self.total:g}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            parts.append(f"{rate:.3g}/s" if rate >= 1 else f"{1 / rate:.3g}s each")
            if self.total and self.done < self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.fields:
            parts.append(_fields(self.fields))
        return "  ".join(parts)

    def advance(self, n: float = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if not finished and now - self.last_line >= self.r.interval:
            self.last_line = now
            self.r.write(self.line())


class _LineReporter(_Reporter):
    """Plain lines for logs: a line when a task starts, one at most every ``interval`` seconds while it
    runs, and one when it ends."""

    def __init__(self, stream=None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.depth = 0  # tasks inside a task report only while they run long

    def write(self, text: str) -> None:
        self.stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
        self.stream.flush()

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        t = _PlainTask(self, description, total)
        outer = self.depth == 0
        if outer:
            self.write(f"{description}: started" + (f" ({total:g} steps)" if total else ""))
        self.depth += 1
        ok = False
        try:
            yield t
            ok = True
        finally:
            self.depth -= 1
            long = time.monotonic() - t.start >= self.interval
            if outer or long or not ok:
                end = f"done in {_duration(time.monotonic() - t.start)}" if ok else "stopped"
                self.write(f"{description}: {end}" + (f"  {_fields(t.fields)}" if t.fields and ok else ""))

    def log(self, message: str) -> None:
        self.write(message)

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
                  for i, c in enumerate(columns)]
        lines = [title, "  ".join(str(c).ljust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()


_reporter: _Reporter = _Reporter()


def use_rich(console=None) -> None:
    """Render progress with rich (called by the CLI)."""
    global _reporter
    _reporter = _RichReporter(console)


def use_lines(stream=None, interval: float = 10.0) -> None:
    """Render progress as plain timestamped lines (for logs)."""
    global _reporter
    _reporter = _LineReporter(stream, interval)


def use_terminal(stream=None) -> None:
    """What the CLI uses: rich bars when ``stream`` (stderr) is a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        use_rich()
    else:
        use_lines(stream)


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
