"""The loop every task shares: examples one by one into a `RunStore` (skipping those already
recorded), a failing example reported and recorded instead of ending the run, a progress bar
with the running score, and the result dictionary written as results.json."""
from __future__ import annotations

import time
from typing import Callable, Sequence

from mplus_fast.eval.progress import Scoreboard, console, progress_bar
from mplus_fast.eval.results import RunStore, environment
from mplus_fast.eval.session import available_modes


def prepare(source, tokenizer, task: str, settings: dict, modes, out, restart: bool) -> tuple[RunStore, tuple[str, ...]]:
    """Checks shared by every task, then the run's store: the tokenizer fits the model, the modes
    this model has, and the run folder (new, resumed, or refused)."""
    tokenizer.check_model(source.config.vocab_size)
    return RunStore(out, task, settings, environment(source), restart=restart), available_modes(source, modes)


def book_todo(n: int, args) -> list[tuple[int, str, tuple]]:
    """n examples over the books in turn (example i reads book i mod 7), keyed "i:<book>"."""
    from mplus_fast.eval.books import book_names
    if n < 1:
        raise ValueError(f"n={n} examples must be at least 1")
    names = book_names()
    return [(i, f"{i}:{names[i % len(names)]}", args(i)) for i in range(n)]


def guarded(fn: Callable[..., dict], key: str, index: int, *args) -> dict:
    """Run one example; a failure is reported and recorded (not fatal, not retried on resume)."""
    try:
        return fn(*args)
    except Exception as exc:   # noqa: BLE001 - one example's failure must not end the run
        console.print(f"[yellow]example {index} failed and is skipped:[/] {type(exc).__name__}: {exc}", soft_wrap=True)
        return {"key": key, "index": index, "error": f"{type(exc).__name__}: {exc}"}


def run_examples(todo: Sequence[tuple[int, str, tuple]], fn: Callable[..., dict], store: RunStore, description: str,
                 running: Callable[[dict], dict[str, float]], progress: bool = True) -> list[dict]:
    """`todo`: (index, key, args of fn). Returns the records of `todo` in order (new or resumed).
    `running(record)` gives the scores shown on the progress bar."""
    board, failures = Scoreboard(), 0
    with progress_bar(description, len(todo), progress) as step:
        for index, key, args in todo:
            if not store.has(key):
                store.add(guarded(fn, key, index, *args))
            rec = store.done[key]
            if "error" in rec:
                failures += 1
            else:
                for name, value in running(rec).items():
                    board.add(name, value)
            step(board.text() + (f" · failed {failures}" if failures else ""))
    return [store.done[key] for _, key, _ in todo]


def finish(store: RunStore, summary: dict, examples: list[dict], started: float) -> dict:
    """The result dictionary (also results.json, without the per-example records)."""
    result = {"task": store.task, "settings": store.settings, **store.env, "summary": summary,
              "timings": {"seconds": round(time.perf_counter() - started, 3), "examples": len(examples),
                          "seconds_per_example": round((time.perf_counter() - started) / max(len(examples), 1), 3)}}
    store.write_results(result)
    return {**result, "examples": examples}


def failed_keys(examples: list[dict]) -> list[str]:
    return [e["key"] for e in examples if "error" in e]


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None
