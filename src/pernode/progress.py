"""Progress for long commands: a rich bar on a terminal, plain lines elsewhere (a log file, CI, a pipe), where a
bar would either vanish or fill the file with redraws.

`progress(...)` takes rich's `Progress` arguments and returns an object with its task API (`add_task`, `advance`,
`update`, used as a context manager), so a caller writes the same code for both. `output_console()` is the
console for tables and text: full width when stdout is not a terminal, where rich would cut tables to 80 columns.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import Progress, TaskID

# Columns for output that is not a terminal: wide enough for any table we print, so nothing is cut ("conte…").
PIPE_WIDTH = 1000
LINE_EVERY_S = 5.0  # at most one line per task this often, besides each tenth of the total and the end


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


def output_console(stderr: bool = False) -> Console:
    """A rich console for tables and text; on a pipe or file it does not wrap or cut at 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if is_terminal(stream) else Console(stderr=stderr, width=PIPE_WIDTH)


class LineProgress:
    """rich.Progress's task API, printing a line per task at each tenth of its total, every LINE_EVERY_S
    seconds at most otherwise, and when it completes."""

    def __init__(self, stream: TextIO | None = None, disable: bool = False, every_s: float = LINE_EVERY_S):
        self.stream = stream or sys.stderr
        self.disable = disable
        self.every_s = every_s
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def start(self) -> None:  # rich's explicit lifecycle, for callers that do not use `with`
        return None

    def stop(self) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> TaskID:
        task_id = TaskID(len(self._tasks))
        now = time.monotonic()
        self._tasks[task_id] = {"description": description, "total": total, "completed": completed,
                                "fields": fields, "start": now, "last_line": now, "last_tenth": 0}
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: TaskID, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        task["fields"].update(fields)
        if completed is not None:
            task["completed"] = completed
        if advance:
            task["completed"] += advance
        self._maybe_print(task)

    def _maybe_print(self, task: dict[str, Any]) -> None:
        now, total, done = time.monotonic(), task["total"], task["completed"]
        tenth = int(10 * done / total) if total else 0
        finished = bool(total) and done >= total
        if not (finished or tenth > task["last_tenth"] or now - task["last_line"] >= self.every_s):
            return
        task["last_tenth"], task["last_line"] = tenth, now
        if self.disable:
            return
        count = f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}"
        info = " ".join(str(v) for v in task["fields"].values() if v not in (None, ""))
        line = f"{task['description']}: {count} {now - task['start']:.1f} s" + (f" {info}" if info else "")
        print(line, file=self.stream, flush=True)


def progress(*columns, disable: bool = False, transient: bool = False, **kwargs) -> Progress | LineProgress:
    """A rich Progress with these columns when stdout is a terminal, else a LineProgress printing lines to
    stderr (stdout stays the command's output)."""
    if is_terminal(sys.stdout):
        return Progress(*columns, disable=disable, transient=transient, **kwargs)
    return LineProgress(disable=disable)
