"""`mplus-fast demo` with the shipped tiny M+ (`mplus_fast/models/tiny-mplus`): it plants facts
in passages of the books, injects D distractor passages after each, asks the question, and shows
side by side what the short-term memory alone answers (retrieval off, as MemoryLLM) and what M+
answers, which injection M+ recalled its rows from (provenance), and the retention curve by
distance (a PNG when matplotlib is installed).

Every fact starts from the model's own memory (the checkpoint's), as `mplus-fast eval retention`
does; the facts are held-out ones (pairs and passages the model never saw in training).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from mplus_fast.checkpoint import load_checkpoint
from mplus_fast.cliutil import CLIError, console
from mplus_fast.model import MPlus
from mplus_fast.training.facts import FactSource, Prose, draw_facts
from mplus_fast.training.monitor import normalise
from mplus_fast.training.vocab import Codec, load_tokenizer

TINY_MODEL = Path(__file__).resolve().parent / "models" / "tiny-mplus"
DISTANCES = (0, 4, 8, 16, 32, 64)


def tiny_model_ready(model_dir: Path = TINY_MODEL) -> bool:
    return all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


@dataclass
class Answer:
    text: str
    correct: bool
    recalled: dict = field(default_factory=dict)   # injection id → retrieved rows (all layers)


def ask(model, codec: Codec, question: str, truth: str, retrieve: bool) -> Answer:
    ids = torch.tensor(codec.encode(question))[None]
    out = model.generate(ids, max_new_tokens=8, retrieve=retrieve)
    text = codec.decode(out[0, ids.shape[1]:]).strip()
    recalled = model(ids).recalled_injections() if retrieve else {}
    return Answer(text, normalise(text) == normalise(truth), recalled)


def run_fact(model, codec, source: FactSource, rng: random.Random, fact, distances) -> dict[int, tuple[Answer, Answer, int]]:
    """Inject the fact's passage, then distractors; at each distance ask in both modes."""
    fact_id = model.state.next_injection_id
    model.inject_memory(torch.tensor(codec.encode(source.fact_context(rng, fact))), update_memory=True)
    out, done = {}, 0
    for d in distances:
        for _ in range(d - done):
            model.inject_memory(torch.tensor(codec.encode(source.distractor(rng)[0])), update_memory=True)
        done = d
        out[d] = (ask(model, codec, fact.question, fact.answer, False), ask(model, codec, fact.question, fact.answer, True),
                  fact_id)
    return out


def recall_label(recalled: dict, fact_id: int, rows_per_read: int) -> str:
    if not recalled:
        return "–"
    n = recalled.get(fact_id, 0)
    others = sorted(((k, v) for k, v in recalled.items() if k != fact_id), key=lambda kv: -kv[1])
    top = f"; most: injection {others[0][0]} ×{others[0][1]}" if others and others[0][1] > n else ""
    return f"the fact ×{n} of {rows_per_read}{top}"


def plot(curves: dict[str, list[float]], distances, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'mplus_fast[plot]'): no plot written"
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, ys in curves.items():
        ax.plot(distances, [100 * y for y in ys], marker="o", label=label)
    ax.set_xlabel("distractor injections after the fact (D)")
    ax.set_ylabel("answers exactly right (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("tiny M+: retention vs distance")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"retention plot: {path}"


def run_recall_demo(facts: int, seed: int, plot_path: Path, backend: str = "fast", model_dir: Path = TINY_MODEL) -> dict:
    t0 = time.perf_counter()
    if not tiny_model_ready(model_dir):
        raise CLIError(f"the trained tiny model is missing ({model_dir}); train it with "
                       "`mplus-fast train mplus_fast/training/configs/tiny-mplus.toml`, or run `mplus-fast demo --random`")
    from mplus_fast.corpus import load_books
    codec = Codec(load_tokenizer(model_dir))
    config, tensors = load_checkpoint(model_dir)
    c = config
    console.print(f"[bold]tiny M+[/] ({model_dir}): {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                  f"T={c.num_tokens} tokens per injection, STM N={c.stm_size}, retrieved R={c.ltm_retrieved}, "
                  f"vocabulary {c.vocab_size}")
    source = FactSource(Prose(load_books(), codec.count, "held_out"), "held_out", c.num_tokens)
    rng = random.Random(seed)
    results = []
    for i, fact in enumerate(draw_facts(rng, "held_out", facts)):
        model = MPlus(config, tensors, backend=backend, seed=seed + i)   # every fact starts from the checkpoint's memory
        results.append((fact, run_fact(model, codec, source, rng, fact, DISTANCES)))
    show = 32
    tab = Table(title=f"After {show} distractor injections ({show * c.num_tokens} tokens): STM only vs M+", title_justify="left")
    for col in ("question", "truth", "STM only", "M+", "M+ recalled (rows, all layers)"):
        tab.add_column(col)
    mark = lambda a: f"[{'green' if a.correct else 'red'}]{escape(a.text) or '∅'}[/]"
    for fact, by_d in results:
        stm, mp, fid = by_d[show]
        tab.add_row(escape(fact.question), escape(fact.answer), mark(stm), mark(mp),
                    recall_label(mp.recalled, fid, c.ltm_retrieved * c.num_hidden_layers))
    console.print(tab)
    curves = {"STM only (retrieval off)": [], "M+": []}
    summary = Table(title="Retention by distance (exact answers)", title_justify="left")
    summary.add_column("D", justify="right")
    summary.add_column("STM only", justify="right")
    summary.add_column("M+", justify="right")
    for d in DISTANCES:
        s = sum(r[d][0].correct for _, r in results) / len(results)
        m = sum(r[d][1].correct for _, r in results) / len(results)
        curves["STM only (retrieval off)"].append(s)
        curves["M+"].append(m)
        summary.add_row(str(d), f"{s:.0%}", f"{m:.0%}")
    console.print(summary)
    console.print(plot(curves, DISTANCES, plot_path))
    console.print(f"[bold green]demo finished in {time.perf_counter() - t0:.1f} s[/] "
                  f"({facts} held-out facts × distances {', '.join(map(str, DISTANCES))}; the random-weights demo: --random)")
    return curves
