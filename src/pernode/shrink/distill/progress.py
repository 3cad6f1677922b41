"""Progress of long work: a rich bar on a terminal, plain lines (about every 5%) when stdout is piped or logged."""
from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StepProgress:
    def __init__(self, description: str, total: int, quiet: bool = False):
        self.description, self.total, self.quiet = description, total, quiet
        self.done, self.info = 0, ""
        self.tty = sys.stdout.isatty()
        self._bar: Progress | None = None
        self._every = max(1, total // 20)
        self._started = time.perf_counter()

    def __enter__(self) -> "StepProgress":
        if self.tty and not self.quiet:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def advance(self, n: int = 1, info: str = "") -> None:
        before, self.done = self.done, self.done + n
        self.info = info or self.info
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=self.info)
        elif not self.quiet and (self.done // self._every > before // self._every or self.done >= self.total):
            print(f"{self.description}: {self.done}/{self.total} {self.info} "
                  f"({time.perf_counter() - self._started:.0f} s)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
