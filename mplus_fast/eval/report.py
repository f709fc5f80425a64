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
        rec = Table(title="recall@R (%) of the fact's injection, by layer (M+ reads); chance: a random choice of R rows",
                    title_justify="left")
        rec.add_column("D", justify="right")
        rec.add_column("any layer", justify="right")
        for l in shown:
            rec.add_column(f"L{l}", justify="right")
        rec.add_column("chance", justify="right")
        rec.add_column("fact rows STM/pend/LTM", justify="right", no_wrap=True)
        for row in rec_rows:
            r = row["recall"]
            rows = r.get("fact_rows_mean")
            where = "/".join("–" if rows[k] is None else f"{rows[k]:.1f}" for k in ("stm", "pending", "ltm")) if rows else "–"
            chance = [c for c in r.get("chance_by_layer", []) if c is not None]
            rec.add_row(str(row["distance"]), _pct(r["any_layer"]), *[_pct(r["by_layer"][l]) for l in shown],
                        _pct(sum(chance) / len(chance)) if chance else "–", where)
        tables.append(rec)
    return tables


def print_tables(tables) -> None:
    for t in tables:
        console.print(t)


def _modes_of(scores: dict) -> list[str]:
    return [m for m in ("mplus", "stm", "borderline") if m in scores]


def longbench_tables(result: dict) -> list[Table]:
    s = result["summary"]
    how = s["postprocess"]
    t = Table(title=f"longbench: score (%) per dataset, answers post-processed: {how}", title_justify="left")
    for col in ("dataset", "metric", "n"):
        t.add_column(col, justify="left" if col != "n" else "right")
    modes = _modes_of(s["average"])
    for m in modes:
        t.add_column(MODE_LABELS[m], justify="right")
    fmt = lambda v: "–" if v is None else f"{v:.1f}"
    for name, row in s["by_dataset"].items():
        t.add_row(name, row["metric"], str(row["n"]), *[fmt(row[m][how]) for m in modes])
    if s["by_dataset"]:
        t.add_row("average", "", "", *[fmt(s["average"][m][how]) for m in modes], style="bold")
    alt = Table(title="longbench: average (%) under each answer post-processing", title_justify="left")
    alt.add_column("post-processing")
    for m in modes:
        alt.add_column(MODE_LABELS[m], justify="right")
    for h in ("official", "first-line", "first-sentence", "none"):
        if s["average"]:
            alt.add_row(h, *[fmt(s["average"][m][h]) for m in modes])
    return [t, alt]


def grid_table(title: str, grid: dict, row_name: str, col_name: str) -> Table:
    """A depth × length (or similar) grid of one mode's accuracy: grid[row][col] in [0, 1]."""
    rows = list(grid)
    cols = sorted({c for r in grid.values() for c in r}, key=float)
    t = Table(title=title, title_justify="left")
    t.add_column(f"{row_name} \\ {col_name}", justify="right")
    for c in cols:
        t.add_column(str(c), justify="right")
    for r in rows:
        t.add_row(str(r), *[_pct(grid[r].get(c)) for c in cols])
    return t


def niah_tables(result: dict) -> list[Table]:
    s = result["summary"]
    tables = [grid_table(f"niah: needle found (%), {MODE_LABELS[m]}", s["grid"][m], "depth", "length")
              for m in s["grid"]]
    if s.get("recall_any_layer_by_length"):
        t = Table(title="niah: recall@R of the needle's injection, any layer (%)", title_justify="left")
        for n in s["recall_any_layer_by_length"]:
            t.add_column(f"L={n}", justify="right")
        t.add_row(*[_pct(v) for v in s["recall_any_layer_by_length"].values()])
        tables.append(t)
    return tables


def scores_table(title: str, summary: dict, columns: list[str], fmt=_pct) -> Table:
    """One row per mode, one column per named score (events: acc, acc_norm; perplexity: ppl)."""
    t = Table(title=title, title_justify="left")
    t.add_column("mode")
    for c in columns:
        t.add_column(c, justify="right")
    for m in ("mplus", "stm", "borderline"):
        if m in summary:
            t.add_row(MODE_LABELS[m], *[fmt(summary[m][c]) for c in columns])
    return t


def events_tables(result: dict) -> list[Table]:
    s = result["summary"]
    t = scores_table(f"events: planted-event multiple choice (%), {s['examples']} questions, chance 25", s, ["acc", "acc_norm"])
    if s.get("recall_any_layer") is not None:
        t.caption = f"recall@R of the event's injection (any layer): {_pct(s['recall_any_layer'])} %"
    return [t]


def perplexity_tables(result: dict) -> list[Table]:
    s = result["summary"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    return [scores_table(f"perplexity of held-out prose ({s['scored_tokens']} tokens)", s, ["ppl"], fmt)]
