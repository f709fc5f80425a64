"""PNG plots of a task's summary (matplotlib, the `eval` extra): accuracy vs distance per mode,
recall@R vs distance per layer, the NIAH depth × length heat map."""
from __future__ import annotations

from pathlib import Path

from mplus_fast.eval.errors import MissingExtra
from mplus_fast.eval.session import MODE_LABELS

COLORS = {"mplus": "tab:blue", "stm": "tab:orange", "borderline": "tab:gray"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra("plots need matplotlib: pip install 'mplus_fast[eval]' (or run with --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def retention_plots(result: dict, folder: str | Path, metric: str = "f1") -> list[Path]:
    plt = _pyplot()
    folder, s = Path(folder), result["summary"]
    rows = [r for r in s["by_distance"] if r["n"]]
    if not rows:
        return []
    dist = [r["distance"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("mplus", "stm"):
        if mode in rows[0]:
            ax.plot(dist, [100 * (r[mode][metric] or 0) for r in rows], "o-", color=COLORS[mode], label=MODE_LABELS[mode])
    if s.get("borderline"):
        ax.axhline(100 * (s["borderline"][metric] or 0), color=COLORS["borderline"], ls="--", label="borderline (no memory)")
    ax.set_xlabel("distance (distractor injections after the fact)")
    ax.set_ylabel(f"{metric.upper()} (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{result['task']}: accuracy vs distance")
    ax.legend()
    paths = [_save(fig, folder / f"{result['task']}_accuracy.png")]
    plt.close(fig)
    rec = [r for r in rows if r.get("recall") and r["recall"].get("by_layer")]
    if rec:
        fig, ax = plt.subplots(figsize=(6, 4))
        layers = len(rec[0]["recall"]["by_layer"])
        for l in range(layers):
            ax.plot([r["distance"] for r in rec], [100 * (r["recall"]["by_layer"][l] or 0) for r in rec],
                    color=plt.cm.viridis(l / max(layers - 1, 1)), alpha=0.6, lw=1, label=f"layer {l}" if layers <= 8 else None)
        ax.plot([r["distance"] for r in rec], [100 * (r["recall"]["any_layer"] or 0) for r in rec], "ko-", lw=2, label="any layer")
        chance = [[c for c in r["recall"].get("chance_by_layer", []) if c is not None] for r in rec]
        if all(chance):
            ax.plot([r["distance"] for r in rec], [100 * sum(c) / len(c) for c in chance], "k:", label="chance (random R rows)")
        ax.set_xlabel("distance (distractor injections after the fact)")
        ax.set_ylabel("recall@R of the fact's injection (%)")
        ax.set_ylim(-2, 102)
        ax.set_title("retrieval: was the injection holding the answer recalled?")
        ax.legend(fontsize=7)
        paths.append(_save(fig, folder / f"{result['task']}_recall.png"))
        plt.close(fig)
    return paths


def heatmap(grid: list[list[float | None]], rows: list, cols: list, title: str, xlabel: str, ylabel: str,
            path: str | Path) -> Path:
    """A 0–100 % heat map (NIAH: depth rows × length columns), each cell labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.5 * len(rows)))
    values = [[float("nan") if v is None else 100 * v for v in r] for r in grid]
    im = ax.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for i, r in enumerate(values):
        for j, v in enumerate(r):
            ax.text(j, i, "–" if v != v else f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="%")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def longbench_plots(result: dict, folder: str | Path) -> list[Path]:
    plt = _pyplot()
    s = result["summary"]
    names, how = list(s["by_dataset"]), s["postprocess"]
    if not names:
        return []
    modes = [m for m in ("mplus", "stm", "borderline") if m in s["average"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    width = 0.8 / len(modes)
    for k, m in enumerate(modes):
        ax.bar([i + k * width for i in range(len(names))], [s["by_dataset"][n][m][how] or 0 for n in names], width,
               color=COLORS[m], label=MODE_LABELS[m])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel(f"score (%), post-processing {how}")
    ax.set_title("LongBench")
    ax.legend()
    path = _save(fig, Path(folder) / "longbench_scores.png")
    plt.close(fig)
    return [path]


def niah_plots(result: dict, folder: str | Path) -> list[Path]:
    out = []
    for mode, g in result["summary"]["grid"].items():
        depths = list(g)
        lengths = sorted({n for r in g.values() for n in r}, key=int)
        out.append(heatmap([[g[d][n] for n in lengths] for d in depths], depths, lengths,
                           f"needle in a haystack: found (%), {MODE_LABELS[mode]}", "haystack length (tokens)",
                           "needle depth", Path(folder) / f"niah_{mode}.png"))
    return out


def bars(result: dict, folder: str | Path, score: str, ylabel: str) -> list[Path]:
    """One bar per mode (events accuracy, perplexity)."""
    plt = _pyplot()
    s = result["summary"]
    modes = [m for m in ("mplus", "stm", "borderline") if m in s and s[m].get(score) is not None]
    if not modes:
        return []
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    scale = 100 if score.startswith("acc") else 1
    ax.bar([MODE_LABELS[m] for m in modes], [scale * s[m][score] for m in modes], color=[COLORS[m] for m in modes])
    ax.set_ylabel(ylabel)
    ax.set_title(result["task"])
    path = _save(fig, Path(folder) / f"{result['task']}_{score}.png")
    plt.close(fig)
    return [path]
