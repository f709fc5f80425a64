"""Ship a trained tiny M+ inside the package (`mplus_fast/models/<name>`):

    python -m mplus_fast.training.ship RUN_FOLDER [--dest mplus_fast/models/tiny-mplus] [--facts 1000]

1. the run's final checkpoint, its memory flushed of training facts: as many training-split prose
   passages are injected as the memory keeps injections, so every row a user's fact meets comes
   from prose (the memory a model ships with should not hold its training questions);
2. its tokenizer, its training config (`train-config.toml`) and training log (`train-log.jsonl`);
3. its retention table on held-out facts (`retention.json`, `retention.md`, `retention.png`):
   `mplus-fast eval retention` on `facts` held-out facts (pairs and passages training never saw),
   each on the shipped memory, STM only vs M+, exact answers by distance, and recall@R.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mplus_fast.checkpoint import load_checkpoint
from mplus_fast.inputs import short_injections_expected
from mplus_fast.model import MPlus

DISTANCES = (0, 8, 32, 64)


def injections_kept(config) -> int:
    """How many injections a row can outlive: the STM's, the pending buffer's and the LTM's lifetimes."""
    stm = config.stm_size // config.num_tokens
    ltm = config.initial_rf_when_moving_stm_to_ltm * config.update_ltm_frequency if config.is_mplus else 0
    return stm + config.update_ltm_frequency + ltm


def flush_memory(model, passage: Callable[[], list[int]]) -> int:
    """Inject passages drawn by `passage()` (token ids; no graph) until no row older than them is
    left in the model's memory; returns how many were injected. Used by `ship` and by training's
    `fresh_memory` stages. The passages are prose cut at sentence ends, often under T tokens, so
    the short-injection warning is expected here and not shown."""
    n = injections_kept(model.config) + 1
    with torch.no_grad(), short_injections_expected():
        for _ in range(n):
            model.inject_memory(torch.tensor(passage(), dtype=torch.int64), update_memory=True)
    return n


def flushed_checkpoint(final: Path, dest: Path, seed: int = 0) -> int:
    """The checkpoint at `final` saved to `dest` after injecting training prose until no row of
    the training memory is left; returns the number of passages injected."""
    from mplus_fast.corpus import load_books
    from mplus_fast.training.facts import FactSource, Prose
    from mplus_fast.training.vocab import Codec, load_tokenizer
    codec = Codec(load_tokenizer(final))
    config, tensors = load_checkpoint(final)
    model = MPlus(config, tensors, backend="reference", seed=seed)
    source = FactSource(Prose(load_books(), codec.count, "train"), "train", config.num_tokens)
    rng = random.Random(seed)
    n = flush_memory(model, lambda: codec.encode(source.distractor(rng)[0]))
    model.save_pretrained(dest)
    shutil.copyfile(final / "tokenizer.json", dest / "tokenizer.json")
    return n


def retention_table(folder: Path, facts: int, distances=DISTANCES, seed: int = 0, work: Path | None = None) -> dict:
    """STM only vs M+ on `facts` held-out facts at each distance (exact answers), with recall@R."""
    from mplus_fast.eval import retention, session
    from mplus_fast.eval.tokenizer import load_tokenizer
    from mplus_fast.qa import read_jsonl
    from mplus_fast.training.facts import write_held_out
    if work is None:                  # the held-out file and the eval's run folder are scratch
        with tempfile.TemporaryDirectory(prefix="mplus-ship-") as scratch:
            return retention_table(folder, facts, distances, seed, Path(scratch))
    data = write_held_out(work / "held-out.jsonl", folder, n=facts, distractors=max(distances), seed=seed)
    source = session.ModelSource.from_pretrained(folder, backend="fast", seed=seed)
    settings = retention.Settings(distances=tuple(distances), modes=("mplus", "stm"), max_new_tokens=8)
    t0 = time.perf_counter()
    with short_injections_expected():   # the held-out passages are cut to T tokens at word ends
        result = retention.run(source, load_tokenizer(None, folder), list(read_jsonl(data)), settings,
                               out=work / "eval", progress=True)
    table = {"facts": facts, "seed": seed, "metric": "exact answer (SQuAD-normalised EM, greedy, 8 tokens)",
             "eval_seconds": round(time.perf_counter() - t0, 1), "stm": {}, "mplus": {}, "recall_any_layer": {},
             "recall_by_layer": {}, "tokens_per_distance": {}}
    for row in result["summary"]["by_distance"]:
        d = str(row["distance"])
        table["stm"][d] = round(row["stm"]["em"], 4)
        table["mplus"][d] = round(row["mplus"]["em"], 4)
        rec = row.get("recall") or {}
        table["recall_any_layer"][d] = None if rec.get("any_layer") is None else round(rec["any_layer"], 4)
        table["recall_by_layer"][d] = [None if x is None else round(x, 4) for x in rec.get("by_layer", [])]
        table["tokens_per_distance"][d] = round(row["tokens_mean"], 1)
    return table


def table_markdown(table: dict) -> str:
    ds = list(table["mplus"])
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    rows = [("D (distractor injections)", ds),
            ("tokens injected after the fact", [f"{table['tokens_per_distance'][d]:.0f}" for d in ds]),
            ("STM only (retrieval off)", [pct(table["stm"][d]) for d in ds]),
            ("M+", [pct(table["mplus"][d]) for d in ds]),
            ("recall@R (a row of the fact retrieved, any layer)", [pct(table["recall_any_layer"][d]) for d in ds])]
    lines = [f"| {rows[0][0]} | " + " | ".join(rows[0][1]) + " |", "| --- |" + " --- |" * len(ds)]
    lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows[1:]]
    return (f"Retention on {table['facts']} held-out facts ({table['metric']}), each on the shipped memory:\n\n"
            + "\n".join(lines) + "\n")


def ship(run: Path, dest: Path, facts: int = 1000, distances=DISTANCES, seed: int = 0) -> dict:
    run, dest = Path(run), Path(dest)
    from mplus_fast.training.config import load_config
    stages = [s.name for s in load_config(run / "config.toml").stages]
    last = run / stages[-1] / "final"
    if not (last / "config.json").is_file():
        raise FileNotFoundError(f"{run}: the last stage ({stages[-1]}) has no final checkpoint; finish the run first")
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    flushed = flushed_checkpoint(last, tmp, seed)
    shutil.copyfile(run / "config.toml", tmp / "train-config.toml")
    shutil.copyfile(run / "log.jsonl", tmp / "train-log.jsonl")
    table = retention_table(tmp, facts, distances, seed)
    table["memory_flushed_with_passages"] = flushed
    (tmp / "retention.json").write_text(json.dumps(table, indent=1) + "\n")
    (tmp / "retention.md").write_text(table_markdown(table))
    from mplus_fast.demo_recall import plot
    plot({"STM only (retrieval off)": [table["stm"][str(d)] for d in distances],
          "M+": [table["mplus"][str(d)] for d in distances]}, list(distances), tmp / "retention.png")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mplus_fast.training.ship", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run folder of `mplus-fast train`")
    ap.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "tiny-mplus")
    ap.add_argument("--facts", type=int, default=1000)
    ap.add_argument("--distances", default=",".join(map(str, DISTANCES)))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    table = ship(a.run, a.dest, a.facts, [int(x) for x in a.distances.split(",")], a.seed)
    print(table_markdown(table))


if __name__ == "__main__":
    main()
