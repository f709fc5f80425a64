"""A rich progress bar over a task's examples with the running score of each mode."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


class Scoreboard:
    """Running means of named scores, shown as "M+ 0.62 · STM only 0.10 · borderline 0.01"."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.counts[name] = self.counts.get(name, 0) + 1

    def text(self) -> str:
        return " · ".join(f"{k} {self.sums[k] / self.counts[k]:.3f}" for k in self.sums)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """`with progress_bar("retention", n) as step: step(scoreboard_text)` after each example."""
    if not enabled:
        yield lambda text="": None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[score]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, score="")
        yield lambda text="": bar.update(task, advance=1, score=text)
