"""Printed tables of a task's summary (rich), the same numbers as results.json."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mplus_fast.eval.session import MODE_LABELS

console = Console(highlight=False)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _triple(scores: dict) -> str:
    """EM/F1/hit in whole percent: "12/40/35"."""
    return "/".join("–" if scores[k] is None else f"{100 * scores[k]:.0f}" for k in ("em", "f1", "hit"))


def retention_tables(result: dict, max_layers: int = 8) -> list[Table]:
    """Accuracy by distance (EM / F1 / hit per mode) and recall@R by layer and distance."""
    summary = result["summary"]
    modes = [m for m in ("mplus", "stm") if any(m in r for r in summary["by_distance"])]
    acc = Table(title=f"{result['task']}: accuracy (%) by distance, EM/F1/hit", title_justify="left")
    acc.add_column("D", justify="right")
    acc.add_column("tokens", justify="right")
    acc.add_column("n", justify="right")
    for m in modes:
        acc.add_column(MODE_LABELS[m], justify="right", no_wrap=True)
    if "borderline" in summary:
        acc.add_column("borderline", justify="right", no_wrap=True)
    b = summary.get("borderline")
    for row in summary["by_distance"]:
        cells = [str(row["distance"]), "–" if row["tokens_mean"] is None else f"{row['tokens_mean']:.0f}", str(row["n"])]
        cells += [_triple(row[m]) for m in modes]
        if b:
            cells.append(_triple(b))
        acc.add_row(*cells)
    tables = [acc]
    rec_rows = [r for r in summary["by_distance"] if r.get("recall")]
    if rec_rows:
        layers = len(rec_rows[0]["recall"]["by_layer"])
        shown = list(range(layers)) if layers <= max_layers else [0, layers // 4, layers // 2, 3 * layers // 4, layers - 1]
        rec = Table(title="recall@R (%) of the fact's injection, by layer (M+ reads)", title_justify="left")
        rec.add_column("D", justify="right")
        rec.add_column("any layer", justify="right")
        for l in shown:
            rec.add_column(f"L{l}", justify="right")
        rec.add_column("fact rows STM/pend/LTM", justify="right", no_wrap=True)
        for row in rec_rows:
            r = row["recall"]
            rows = r.get("fact_rows_mean")
            where = "/".join("–" if rows[k] is None else f"{rows[k]:.1f}" for k in ("stm", "pending", "ltm")) if rows else "–"
            rec.add_row(str(row["distance"]), _pct(r["any_layer"]), *[_pct(r["by_layer"][l]) for l in shown], where)
        tables.append(rec)
    return tables


def print_tables(tables) -> None:
    for t in tables:
        console.print(t)
