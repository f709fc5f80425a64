"""What a run shows and keeps: a rich progress bar (loss, answer accuracy, retriever recall,
tokens/s) and `log.jsonl`, one JSON object per line."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path


class RunLog:
    def __init__(self, path: Path | None, show: bool = True):
        self.path, self.show = path, show
        self.console = None
        if show:
            from rich.console import Console
            self.console = Console(highlight=False)

    def write(self, line: dict) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        if "monitor" in line and self.console:
            m = "  ".join(f"{k} {v:.0%}" for k, v in line["monitor"].items())
            self.console.print(f"[bold]{line['stage']} step {line['step']}[/] retention (held-out, greedy): {m}")

    def note(self, text: str) -> None:
        if self.console:
            self.console.print(text)

    @contextlib.contextmanager
    def progress(self, stage, start: int, total: int):
        if not self.show:
            yield _Silent()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        cols = [TextColumn(f"[bold]{stage.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*cols, console=self.console) as prog:
            task = prog.add_task(stage.name, total=total, completed=start, info="")
            yield _Bar(prog, task, total)


def summary(line: dict) -> str:
    parts = [f"loss {line['loss']:.3f}" if "loss" in line else ""]
    if "qa_acc" in line:
        parts.append(f"answers {line['qa_acc']:.0%}")
    if "recall" in line:
        parts.append(f"recall@R {line['recall']:.0%}")
    parts.append(f"{line.get('tokens_per_s', 0):.0f} tok/s")
    return "  ".join(p for p in parts if p)


class _Bar:
    def __init__(self, prog, task, total: int):
        self.prog, self.task, self.total = prog, task, total

    def update(self, step: int, line: dict) -> None:
        self.total = max(step, self.total)   # an until_accuracy stage may run past `steps`
        self.prog.update(self.task, completed=step, total=self.total, info=summary(line))


class _Silent:
    def update(self, step: int, line: dict) -> None:
        pass
