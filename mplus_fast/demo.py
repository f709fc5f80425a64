"""`mplus-fast demo`: stream many chunks into an M+ memory, watch STM/LTM grow and merge, then ask
prompts and show which past injections each one recalled, what it generated, and what it cost.

Without --ckpt the model is a small RANDOM checkpoint (cached on disk): it shows the machinery,
not language. With --ckpt and --tokenizer it injects a real document and answers questions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import mplus_fast
from mplus_fast.cliutil import CLIError, Timer, console, decode, encode, fmt_bytes, load_tokenizer, peak_rss_bytes
from mplus_fast.generation import resolve_eos
from mplus_fast.testing import FIRST_PLAIN_ID, make_random_checkpoint

# Small enough for ~25 ms per injection on one CPU core; every M+ mechanism still happens
# (STM drops, pending buffer, a merge every 4 chunks, pruning after 3 merges, retrieval of R=32).
DEMO_CONFIG = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, num_tokens=16, num_blocks=12, num_ltm_blocks=2, update_ltm_frequency=4,
    initial_rf_when_moving_stm_to_ltm=3, decay_frequency=1, ltm_initial_size=64, selector_hidden_dim=32,
)

DEFAULT_DOC = (
    "The lighthouse on Skerry Island was built in 1874 by the engineer Margaret Holt. Its lamp burned "
    "whale oil until 1911, when it was converted to kerosene, and it was electrified in 1952. The keeper "
    "Thomas Reid lived there for thirty-one years with his two dogs, Pilot and Brass. In the storm of "
    "1927 the lantern glass shattered, and Reid kept a hand lamp burning all night so that the fishing "
    "fleet could find the harbour. The station was automated in 1989 and is now a museum open from May "
    "to September."
)
DEFAULT_QUESTIONS = ("Who built the lighthouse on Skerry Island?", "What were the names of the keeper's dogs?")


def cache_root() -> Path:
    return Path(os.environ.get("MPLUS_FAST_CACHE") or Path.home() / ".cache" / "mplus_fast")


def demo_checkpoint(seed: int) -> tuple[Path, bool]:
    """The cached random demo checkpoint for this geometry and seed: (path, created_now)."""
    key = hashlib.sha256(json.dumps({"config": DEMO_CONFIG, "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"demo-{key}"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    make_random_checkpoint(tmp, seed=seed, **DEMO_CONFIG)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return path, True


@dataclass
class Stream:
    chunks: list[torch.Tensor]
    first_injection: int = 0
    times: list[float] = field(default_factory=list)
    merges: int = 0
    pruned: int = 0       # layer 0, summed over merges
    rows: list[tuple] = field(default_factory=list)

    def chunk_of(self, injection_id: int) -> str:
        k = injection_id - self.first_injection
        return "checkpoint" if injection_id < 0 or not 0 <= k < len(self.chunks) else f"chunk {k}"


def stream_chunks(model, stream: Stream, table_every: int) -> None:
    """Inject every chunk with update_memory=True under a progress bar; snapshot every `table_every`."""
    is_mplus = model.config.is_mplus
    columns = [TextColumn("[bold]injecting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("inject", total=len(stream.chunks), info="")
        for k, ids in enumerate(stream.chunks):
            with Timer(model.device) as t:
                model.inject_memory(ids.to(model.device), update_memory=True)
            stream.times.append(t.s)
            rec = model.last_update
            if rec.merged:
                stream.merges += 1
                stream.pruned += rec.pruned[0]
            s = model.memory_stats()
            ltm = s["ltm_tokens_per_layer"]
            info = f"LTM {min(ltm)}–{max(ltm)}  pending {s['pending_tokens']}  merges {stream.merges}" if is_mplus else ""
            progress.update(task, advance=1, info=info)
            early = k == 0 or (rec.merged and stream.merges <= 3)  # show the first merges filling the LTM
            if early or (k + 1) % table_every == 0 or k + 1 == len(stream.chunks):
                window = stream.times[-table_every:]
                stream.rows.append((k, s["stm_tokens_per_layer"], s["pending_tokens"], ltm, stream.merges, stream.pruned,
                                    1e3 * sum(window) / len(window)))


def growth_table(stream: Stream) -> Table:
    tab = Table(title="Memory growth (per layer; LTM shown min–max over layers)", title_justify="left")
    for col in ("after chunk", "STM", "pending", "LTM", "merges", "pruned (L0)", "ms/chunk"):
        tab.add_column(col, justify="right")
    for k, stm, pend, ltm, merges, pruned, ms in stream.rows:
        lt = f"{min(ltm)}" if ltm and min(ltm) == max(ltm) else (f"{min(ltm)}–{max(ltm)}" if ltm else "–")
        tab.add_row(str(k), str(stm), str(pend), lt, str(merges), str(pruned), f"{ms:.1f}")
    return tab


def where_is(model, injection_id: int) -> str:
    """Where the tokens of one injection live now, in layer 0."""
    st = model.state
    n_stm = int((st.stm_prov[0] == injection_id).sum())
    if not model.config.is_mplus:
        return f"STM {n_stm}"
    n_pend = int((st.pend_prov[0] == injection_id).sum())
    n_ltm = int((st.ltm_prov[0] == injection_id).sum())
    return f"STM {n_stm} · pending {n_pend} · LTM {n_ltm}" if n_stm + n_pend + n_ltm else "forgotten (pruned)"


def ask(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    ids = prompt.to(model.device)[None]
    with Timer(model.device) as t_pre:
        out = model(ids)
    with Timer(model.device) as t_gen:
        gen = model.generate(ids, max_new_tokens=new_tokens)
    new = gen[0, ids.shape[1]:].tolist()
    eos = set(resolve_eos(model, None))
    stop = next((i for i, t in enumerate(new) if t in eos), None)
    new = new if stop is None else new[: stop + 1]  # drop the padding after EOS
    recalled = sorted(out.recalled_injections().items(), key=lambda kv: (-kv[1], kv[0]))
    return dict(recalled=recalled, new=new, prefill_s=t_pre.s, gen_s=t_gen.s)


def pick_prompts(model, stream: Stream, T: int) -> list[tuple[str, torch.Tensor, int]]:
    """Synthetic prompts: the opening tokens of the first chunk, of the chunk with the most rows in
    layer 0's LTM now (if any), and of the last chunk."""
    n = len(stream.chunks)
    labels = {0: "first chunk", n - 1: "last chunk"}
    if model.config.is_mplus:
        prov = model.state.ltm_prov[0] - stream.first_injection
        prov = prov[(prov >= 0) & (prov < n)]
        if prov.numel():
            labels.setdefault(int(torch.bincount(prov).argmax()), "most rows in the LTM now")
    return [(f"span of chunk {k} ({labels[k]})", stream.chunks[k][: min(T, 12)], stream.first_injection + k)
            for k in sorted(labels)]


def run_demo(ckpt: str | None, tokenizer: str | None, chunks: int, seed: int, device: str, dtype, doc: str | None,
             questions: list[str], new_tokens: int, table_every: int, backend: str = "fast") -> None:
    t_start = time.perf_counter()
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None and ckpt is None:
        raise CLIError("--tokenizer needs --ckpt: the built-in demo model has random weights and its own 512-token vocabulary")
    if (doc is not None or questions) and tok is None:
        raise CLIError("--doc and --question need --ckpt and --tokenizer")
    if tok is None and chunks < 1:
        raise CLIError(f"--chunks {chunks} must be at least 1")
    created = False
    t_make = Timer()
    if ckpt is None:
        with t_make:
            path, created = demo_checkpoint(seed)
        console.print(Panel(
            "[bold]These weights are RANDOM.[/] The model below is a small random M+ checkpoint, so every "
            "generated token is meaningless: the demo shows the memory machinery (injection, STM→LTM merges, "
            "retrieval, timings), not language.\nFor real text run: [bold]mplus-fast demo --ckpt DIR --tokenizer PATH[/]",
            title="random weights", border_style="yellow"))
        console.print(f"checkpoint: {path} ({'created' if created else 'cached'})")
    else:
        path = Path(ckpt)
        note = "real text mode" if tok else "no --tokenizer: token ids only, synthetic chunks"
        console.print(Panel(f"weights from [bold]{path}[/] ({note}); output is meaningful only if these are trained weights",
                            title="checkpoint", border_style="cyan"))
    with Timer(device) as t_load:
        model = mplus_fast.load(path, device=device, dtype=dtype, seed=seed, backend=backend)
    c = model.config
    console.print(f"{model!r}\nT={c.num_tokens} tokens per injection, STM N={c.stm_size}, retrieved R={c.ltm_retrieved}"
                  + (f", merge every {c.update_ltm_frequency} injections" if c.is_mplus else ""))

    T = c.num_tokens
    if tok is not None:
        doc_ids = encode(tok, Path(doc).read_text() if doc else DEFAULT_DOC)
        stream = Stream(list(torch.split(doc_ids, T)), model.state.next_injection_id)
        prompts = [(q, encode(tok, q), None) for q in (questions or DEFAULT_QUESTIONS)]
    else:
        g = torch.Generator().manual_seed(seed)
        text = torch.randint(FIRST_PLAIN_ID, c.vocab_size, (chunks * T,), generator=g)
        stream = Stream(list(torch.split(text, T)), model.state.next_injection_id)
    stream_chunks(model, stream, table_every or max(1, len(stream.chunks) // 10))
    if tok is None:
        prompts = pick_prompts(model, stream, T)
    console.print(growth_table(stream))

    answers = []
    for label, ids, source in prompts:
        a = ask(model, ids, new_tokens)
        answers.append(a)
        top = ", ".join(f"{stream.chunk_of(i)} ×{n}" for i, n in a["recalled"][:4]) or "nothing (no LTM)"
        body = [f"[bold]prompt[/]: {escape(decode(tok, ids)) if tok else ids.tolist()}"]
        if source is not None:
            body.append(f"[bold]that chunk now[/] (layer 0): {where_is(model, source)}")
        body.append(f"[bold]recalled[/] (LTM rows over {c.num_hidden_layers} layers, by source): {top}")
        body.append(f"[bold]generated[/] ({len(a['new'])} greedy): {escape(decode(tok, a['new'])) if tok else a['new']}")
        console.print(Panel("\n".join(body), title=label, title_align="left"))

    n_inj = len(stream.times)
    inj = sum(stream.times)
    tab = Table(title="Timings", title_justify="left")
    tab.add_column("phase")
    tab.add_column("time", justify="right")
    if ckpt is None:
        tab.add_row("create demo checkpoint" if created else "find cached checkpoint", f"{t_make.s:.2f} s")
    tab.add_row("load", f"{t_load.s:.2f} s")
    tab.add_row(f"inject total ({n_inj} chunks × {T} tokens)", f"{inj:.2f} s")
    tab.add_row("inject per chunk (mean)", f"{1e3 * inj / n_inj:.1f} ms")
    tab.add_row("prompt prefill (forward, mean)", f"{1e3 * sum(a['prefill_s'] for a in answers) / len(answers):.1f} ms")
    per_tok = [(a["gen_s"] - a["prefill_s"]) / len(a["new"]) for a in answers if a["new"]]
    if per_tok:
        tab.add_row("generation per token (≈ (generate − prefill) / new)", f"{1e3 * sum(per_tok) / len(per_tok):.1f} ms")
    console.print(tab)

    s = model.memory_stats()
    mem = ", ".join(f"{dev}: {fmt_bytes(b)}" for dev, b in s["memory_bytes_by_device"].items())
    console.print(f"memory state: {mem}; weights: {fmt_bytes(s['weight_bytes'])}; peak RSS: {fmt_bytes(peak_rss_bytes())}")
    console.print(f"[bold green]demo finished in {time.perf_counter() - t_start:.1f} s[/]{process_time_note()}")


def process_time_note() -> str:
    """Wall time since the process started (Python and torch start-up included), if psutil is there."""
    try:
        import psutil
        return f" ({time.time() - psutil.Process().create_time():.1f} s since the process started)"
    except Exception:
        return ""
