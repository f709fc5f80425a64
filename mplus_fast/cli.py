"""The `mplus-fast` command line: demo, inspect, generate, inject, bench, budget, serve, eval, train.

Commands stay thin: they parse options, call the public API (`mplus_fast.load`, `MPlus`), and
print with rich. User errors (missing checkpoint, bad ids, bad options) print one red line and
exit with code 2; see `cliutil.user_errors`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.markup import escape
from rich.table import Table

import mplus_fast
from mplus_fast.checkpoint import load_checkpoint
from mplus_fast.chunking import chunk_ids
from mplus_fast.cliutil import (CLIError, console, decode, encode, fmt_bytes, load_tokenizer, parse_device, parse_dtype,
                                parse_ids, set_threads, user_errors)

app = typer.Typer(help="mplus_fast: fast, faithful inference for M+ / MemoryLLM memory-augmented LLMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _print_version(value: bool):
    if value:
        console.print(f"mplus_fast {mplus_fast.__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    """mplus_fast: fast, faithful inference for M+ / MemoryLLM memory-augmented LLMs."""


DEVICE = typer.Option("auto", help="Device for weights and memory: auto (the GPU when one is present, else cpu), cpu, cuda, cuda:1, ...")
DTYPE = typer.Option(None, help="Compute dtype: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).")
SEED = typer.Option(0, help="Seeds the model's generator (memory drops, sampling) and synthetic data.")
TOKENIZER = typer.Option(None, help="A tokenizer.json, or a folder holding one (needs the `tokenizers` package).")
IDS = typer.Option(None, help='Token ids instead of text, e.g. "1,2,3" (no tokenizer needed).')


def _threads(default: int, what: str):
    return typer.Option(default, help=f"torch CPU threads (0: torch's default). Default {default}: {what}.")


def _input_ids(text: Optional[str], ids: Optional[str], tokenizer: Optional[str], text_flag: str):
    """Exactly one of text (with a tokenizer) or --ids → (ids (n,), tokenizer or None)."""
    if (text is None) == (ids is None):
        raise CLIError(f"give exactly one of {text_flag} (with --tokenizer) or --ids")
    if ids is not None:
        return parse_ids(ids), (load_tokenizer(tokenizer) if tokenizer else None)
    if tokenizer is None:
        raise CLIError(f"{text_flag} needs --tokenizer PATH (or pass token ids with --ids)")
    tok = load_tokenizer(tokenizer)
    return encode(tok, text), tok


BACKEND = typer.Option("fast", help="Backend: fast (cached K/V memory) or reference (the authors' computation).")


def _load(ckpt: Path, device: str, dtype: Optional[str], seed: int, backend: str):
    return mplus_fast.load(ckpt, device=parse_device(device), dtype=parse_dtype(dtype), seed=seed, backend=backend)


@app.command()
@user_errors
def demo(
    random_weights: bool = typer.Option(False, "--random", help="The machinery demo on a small RANDOM checkpoint (no language)."),
    facts: int = typer.Option(12, help="Held-out facts the trained tiny model is asked about (default demo)."),
    plot: Optional[Path] = typer.Option(None, help="Where the retention plot goes (default: the cache folder, demo-retention.png)."),
    ckpt: Optional[Path] = typer.Option(None, help="A real M+ checkpoint (machinery demo). Default: the shipped tiny M+ (trained)."),
    tokenizer: Optional[str] = TOKENIZER,
    chunks: int = typer.Option(200, help="--random / --ckpt: synthetic chunks of T tokens to inject (ignored with --tokenizer)."),
    doc: Optional[Path] = typer.Option(None, help="Text file to inject (with --ckpt and --tokenizer). Default: a built-in paragraph."),
    question: Optional[List[str]] = typer.Option(None, help="A question to ask after injection (repeatable; with --tokenizer)."),
    new_tokens: int = typer.Option(16, help="Greedy tokens generated per prompt (--random / --ckpt)."),
    table_every: int = typer.Option(0, help="A memory-growth table row every K chunks (0: about 10 rows)."),
    seed: int = typer.Option(0, help="Seeds the facts and distractors (or the random checkpoint), and the model's generator."),
    device: str = DEVICE, dtype: Optional[str] = DTYPE, backend: str = BACKEND,
    threads: int = _threads(1, "the demo models are tiny, one thread is fastest"),
):
    """The trained tiny M+ recalls planted facts that the short-term memory alone has forgotten (STM-only vs M+
    answers, provenance, retention plot). --random: the memory machinery on random weights; --ckpt: on any checkpoint."""
    set_threads(threads)
    device, dt = str(parse_device(device)), parse_dtype(dtype)
    if chunks < 1 and not tokenizer:
        raise CLIError(f"--chunks {chunks} must be at least 1")
    if not random_weights and ckpt is None:
        if tokenizer or doc or question:
            raise CLIError("--tokenizer/--doc/--question need --ckpt (the tiny model brings its own tokenizer)")
        if facts < 1:
            raise CLIError(f"--facts {facts} must be at least 1")
        from mplus_fast.demo import cache_root
        from mplus_fast.demo_recall import TINY_MODEL, run_recall_demo, tiny_model_ready
        if tiny_model_ready():
            run_recall_demo(facts, seed, plot or cache_root() / "demo-retention.png", backend)
            return
        console.print(f"[yellow]The trained tiny M+ is not shipped in this checkout ({TINY_MODEL}); train it with "
                      "`mplus-fast train mplus_fast/training/configs/tiny-mplus.toml` (see docs/training.md). "
                      "Running the random-weights machinery demo instead.[/]")
    from mplus_fast.demo import run_demo
    if ckpt is None and (tokenizer or doc or question):
        raise CLIError("--tokenizer/--doc/--question need --ckpt pointing at a real model (the random demo model is random)")
    run_demo(str(ckpt) if ckpt else None, tokenizer, chunks, seed, device, dt,
             str(doc) if doc else None, list(question or []), new_tokens, table_every, backend)


@app.command()
@user_errors
def inspect(ckpt: Path = typer.Argument(..., help="Checkpoint folder (config.json + safetensors), or a Hugging Face "
                                                   "hub id resolved from the local hub cache.")):
    """Summarise a checkpoint: architecture, sizes, tensors and the state of its memory (no model is built)."""
    from mplus_fast.hf.hub import resolve_checkpoint
    config, tensors = load_checkpoint(resolve_checkpoint(ckpt))
    c = config
    lora = c.lora_config or {}
    tab = Table(title=f"{ckpt}", title_justify="left", show_header=False)
    rows = [
        ("architecture", c.architecture),
        ("layers / hidden / intermediate", f"{c.num_hidden_layers} / {c.hidden_size} / {c.intermediate_size}"),
        ("heads / kv heads / head_dim", f"{c.num_attention_heads} / {c.num_key_value_heads or c.num_attention_heads} / "
                                        f"{c.head_dim or c.hidden_size // c.num_attention_heads}"),
        ("vocab", str(c.vocab_size)),
        ("T (tokens per injection)", str(c.num_tokens)),
        ("STM size N per layer", str(c.stm_size)),
        ("R (LTM retrieved per layer)", str(c.ltm_retrieved)),
        ("LoRA r / alpha", f"{lora.get('r', '–')} / {lora.get('lora_alpha', '–')}"),
        ("RoPE", f"{c.rope_type} (theta {c.rope_theta:g})"),
    ]
    if c.is_mplus:
        rows += [("selector dim / layers", f"{c.selector_hidden_dim} / {c.num_selector_layers}"),
                 ("merge every / initial rf / decay", f"{c.update_ltm_frequency} injections / {c.initial_rf_when_moving_stm_to_ltm:g} / "
                                                      f"{c.decay_frequency:g}"),
                 ("LTM capacity per layer", str(c.max_ltm_tokens))]
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    rows.append(("tensors", f"{len(tensors)}, {fmt_bytes(nbytes)} ({', '.join(dtypes)})"))
    rows += _memory_rows(c, tensors)
    for k, v in rows:
        tab.add_row(k, escape(v))
    console.print(tab)


def _memory_rows(c, t: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    L = c.num_hidden_layers
    step = int(t["update_step"]) if "update_step" in t else 0
    if not c.is_mplus:
        init = int(t["initialized"]) if "initialized" in t else 1
        return [("memory initialized", str(bool(init))), ("update step", str(step))]
    ltm = [t[f"ltm.{i}"].shape[0] for i in range(L)]
    pend = t["cached_dropped_memories.0"].shape[0] if "cached_dropped_memories.0" in t else 0
    ages = torch.cat([t[f"ltm_ages.{i}"].to(torch.int64) for i in range(L)])
    age_range = f"{int(ages.min())} … {int(ages.max())}" if ages.numel() else "empty"
    per_layer = str(ltm[0]) if len(set(ltm)) == 1 else ", ".join(map(str, ltm))
    return [("LTM tokens per layer", per_layer), ("pending (not yet merged)", str(pend)),
            ("update step", f"{step} / {c.update_ltm_frequency * c.num_tokens}"), ("LTM ages", age_range)]


@app.command()
@user_errors
def generate(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder, or a Hugging Face hub id resolved from the local hub cache."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text (needs --tokenizer). No BOS is added: M+ has its own."),
    ids: Optional[str] = IDS, tokenizer: Optional[str] = TOKENIZER,
    max_new_tokens: int = typer.Option(32, help="Tokens to generate at most (stops early at EOS)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (with --sample)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling threshold in (0, 1] (with --sample)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely tokens (with --sample)."),
    eos: Optional[str] = typer.Option(None, help='End-of-sequence token id(s), e.g. "128001,128009" (default: the checkpoint\'s generation_config.json / config.json).'),
    seed: int = SEED, device: str = DEVICE, dtype: Optional[str] = DTYPE, backend: str = BACKEND,
    threads: int = _threads(0, "torch's choice"),
):
    """Continue a prompt over the checkpoint's memory (the memory is read, not changed)."""
    from mplus_fast.generation import check_options
    set_threads(threads)
    parse_device(device), parse_dtype(dtype)
    check_options(max_new_tokens, sample, temperature, top_k, top_p, warn=False)   # every option before the model loads
    eos_ids = parse_ids(eos).tolist() if eos is not None else None
    x, tok = _input_ids(prompt, ids, tokenizer, "--prompt")
    model = _load(ckpt, device, dtype, seed, backend)
    out = model.generate(x.to(model.device)[None], max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=eos_ids)
    new = out[0, x.shape[0]:].tolist()
    if tok is not None:
        console.print(escape(decode(tok, new)))
    console.print(f"ids: {new}", style="dim" if tok is not None else None)


@app.command()
@user_errors
def inject(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder to read, or a Hugging Face hub id resolved from the local hub cache."),
    text: Optional[str] = typer.Option(None, help="Text to inject (needs --tokenizer)."),
    file: Optional[Path] = typer.Option(None, help="Text file to inject (needs --tokenizer)."),
    ids: Optional[str] = IDS, tokenizer: Optional[str] = TOKENIZER,
    chunk_tokens: int = typer.Option(0, help="Tokens per injection (0: the model's T = num_tokens); a tail under 16 tokens joins the last chunk."),
    out: Optional[Path] = typer.Option(None, help="Folder to save the updated checkpoint into (its other files are kept)."),
    in_place: bool = typer.Option(False, "--in-place", help="Save into CKPT itself (crash-safe; tokenizer and other files kept)."),
    memory: Optional[Path] = typer.Option(None, help="A memory file (.safetensors): start from it when it exists, and save ONLY the memory there (the weights are not rewritten)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow --out to replace a config.json / weights that are not an M+ checkpoint's."),
    seed: int = SEED, device: str = DEVICE, dtype: Optional[str] = DTYPE, backend: str = BACKEND,
    threads: int = _threads(0, "torch's choice"),
):
    """Write a context into the memory (update_memory=True, chunk by chunk) and save the checkpoint (or only the memory)."""
    set_threads(threads)
    parse_device(device), parse_dtype(dtype)
    if sum([out is not None, in_place, memory is not None]) != 1:
        raise CLIError("give exactly one of --out DIR, --in-place or --memory FILE")
    if in_place and not ckpt.is_dir():
        raise CLIError(f"--in-place needs CKPT to be a local checkpoint folder; {ckpt} is not one (a hub id is read "
                       "from the hub cache, which is never written): use --out DIR or --memory FILE")
    if chunk_tokens < 0:
        raise CLIError(f"--chunk-tokens {chunk_tokens} must be positive (or 0: the model's T)")
    if memory is not None and memory.suffix != ".safetensors":
        raise CLIError(f"--memory {memory}: a memory file's name ends in .safetensors")
    if text is not None and file is not None:
        raise CLIError("give only one of --text or --file")
    if file is not None:
        if not file.is_file():
            raise CLIError(f"--file not found: {file}")
        text = file.read_text()
    x, _ = _input_ids(text, ids, tokenizer, "--text/--file")
    model = _load(ckpt, device, dtype, seed, backend)
    if memory is not None and memory.is_file():
        model.load_memory(memory)
    merges = 0
    chunks = chunk_ids(x, chunk_tokens or model.config.num_tokens)   # no tiny tail chunk
    for chunk in chunks:
        model.inject_memory(chunk.to(model.device), update_memory=True)
        merges += bool(getattr(model.last_update, "merged", False))
    target = model.save_memory(memory) if memory is not None else model.save_pretrained(ckpt if in_place else out, overwrite=overwrite)
    s = model.memory_stats()
    ltm = s["ltm_tokens_per_layer"]
    console.print(f"injected {x.shape[0]} tokens in {len(chunks)} chunk(s); merges: {merges}; "
                  f"LTM per layer: {ltm[0] if ltm else 0}; pending: {s['pending_tokens']}; saved to {target}")


@app.command()
@user_errors
def bench(
    ckpt: Optional[Path] = typer.Argument(None, help="Checkpoint folder (default: the random demo checkpoint)."),
    prompt_len: int = typer.Option(64, help="Prompt tokens for the prefill."),
    new_tokens: int = typer.Option(16, help="Decode steps timed per round."),
    repeats: int = typer.Option(5, help="Timed rounds (after one warm-up); the median is shown."),
    profile: Optional[Path] = typer.Option(None, help="Also write a torch.profiler chrome trace of one round to this .json."),
    seed: int = SEED, device: str = DEVICE, dtype: Optional[str] = DTYPE, backend: str = BACKEND,
    threads: int = _threads(1, "best for the tiny demo model; use 0 for real models"),
):
    """Time inject, prefill and decode of one backend; optionally write a profiler trace."""
    from mplus_fast.quickbench import run_bench
    set_threads(threads)
    device, dt = str(parse_device(device)), parse_dtype(dtype)
    run_bench(str(ckpt) if ckpt else None, prompt_len, new_tokens, repeats, seed, device, dt,
              str(profile) if profile else None, backend)


@app.command()
@user_errors
def budget(
    ckpt: Optional[Path] = typer.Argument(None, help="Checkpoint folder whose config.json gives the geometry "
                                                      "(only the config is read; default: the released M+ 8B)."),
    placement: str = typer.Option("host", help="Where the LTM bank lives: host, device, or both (one table each)."),
    batch: int = typer.Option(1, help="Sequences prefilled and decoded together."),
    prompt_len: int = typer.Option(512, help="Prompt tokens per sequence."),
    new_tokens: int = typer.Option(64, help="Tokens the decode cache holds room for."),
    decode_steps: int = typer.Option(1, help="Decode steps simulated (the cache is static: one step gives the "
                                             "peak of all; each costs about a second)."),
    ltm_rows: Optional[int] = typer.Option(None, help="LTM rows per layer (default: the config's cap)."),
    dtype: str = typer.Option("bfloat16", help="Compute dtype: bfloat16, float16 or float32."),
):
    """The GPU memory budget (and host memory) of load, prefill and decode, computed by running the
    engine on data-less tensors and counting what it allocates (mplus_fast.budget; no GPU needed)."""
    from mplus_fast.budget import released_config, run_budget
    from mplus_fast.config import MPlusConfig
    placements = {"host": ["host"], "device": ["device"], "both": ["host", "device"]}.get(placement)
    if placements is None:
        raise CLIError(f"--placement {placement!r} is not one of host, device, both")
    for name, value in (("--batch", batch), ("--prompt-len", prompt_len), ("--new-tokens", new_tokens),
                        ("--decode-steps", decode_steps)):
        if value < 1:
            raise CLIError(f"{name} {value} must be at least 1")
    if ltm_rows is not None and ltm_rows < 0:
        raise CLIError(f"--ltm-rows {ltm_rows} must be non-negative")
    config = MPlusConfig.from_file(ckpt / "config.json") if ckpt else released_config()
    for where in placements:
        b = run_budget(config, dtype=parse_dtype(dtype), ltm_placement=where, ltm_rows=ltm_rows, batch=batch,
                       prompt=prompt_len, new_tokens=new_tokens, decode_steps=decode_steps)
        typer.echo(b.table())


@app.command()
@user_errors
def serve(
    ckpt: str = typer.Argument(..., help="Checkpoint folder, or a Hugging Face hub id resolved from the local hub cache."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes the server)."),
    port: int = typer.Option(8000, help="TCP port."),
    data_dir: Optional[Path] = typer.Option(None, help="Where memories are kept (default: ~/.cache/mplus_fast/serve/<model fingerprint>)."),
    api_key: Optional[str] = typer.Option(None, envvar="MPLUS_FAST_API_KEY", help="Require 'Authorization: Bearer KEY' (also from $MPLUS_FAST_API_KEY)."),
    model_name: Optional[str] = typer.Option(None, help="The model id clients send (default: the checkpoint folder's name)."),
    tokenizer: Optional[str] = typer.Option(None, help="A tokenizer.json or folder (default: the checkpoint's own)."),
    max_queue: int = typer.Option(16, help="Requests that may wait for the model; more are answered 429."),
    max_tokens: int = typer.Option(2048, help="The largest max_tokens a request may ask for."),
    max_prompt_tokens: int = typer.Option(8192, help="The longest prompt accepted, in tokens."),
    max_body_mb: float = typer.Option(1.0, help="Largest JSON request body, MiB."),
    max_inject_mb: float = typer.Option(32.0, help="Largest injection body, MiB."),
    request_timeout: float = typer.Option(300.0, help="Seconds a request may compute before it is stopped (504)."),
    queue_timeout: float = typer.Option(60.0, help="Seconds a request may wait in the queue (then 503)."),
    resident_mb: float = typer.Option(1024.0, help="Host memory, MiB, for the recently used memories kept with their "
                                                   "cached K/V (switching back needs no disk read or recomputation); 0: none."),
    seed: int = SEED, device: str = DEVICE, dtype: Optional[str] = DTYPE, backend: str = BACKEND,
    threads: int = _threads(0, "torch's choice"),
):
    """Serve the model over an OpenAI-compatible HTTP API, with persistent memories (docs/serving.md)."""
    from mplus_fast.serve.cli import run_server
    run_server(ckpt=ckpt, host=host, port=port, data_dir=data_dir, api_key=api_key, model_name=model_name,
               tokenizer=tokenizer, max_queue=max_queue, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
               max_body_mb=max_body_mb, max_inject_mb=max_inject_mb, request_timeout=request_timeout,
               queue_timeout=queue_timeout, resident_mb=resident_mb, seed=seed, device=str(parse_device(device)), dtype=parse_dtype(dtype), backend=backend,
               threads=threads)


@app.command()
@user_errors
def train(
    config: Path = typer.Argument(..., help="Training config (TOML): shared settings and one or more \\[\\[stage]] tables."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: the config's `out`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the folder from its newest checkpoint."),
    max_steps: Optional[int] = typer.Option(None, help="Stop each stage after this many steps (a resumable checkpoint is written)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar (the log is still written)."),
):
    """Train M+ (dual-LoRA memory write/read + retriever) by the stages of CONFIG; see docs/training.md."""
    from mplus_fast.training import load_config
    from mplus_fast.training import train as run_training
    if max_steps is not None and max_steps < 1:
        raise CLIError(f"--max-steps {max_steps} must be at least 1")
    cfg = load_config(config)
    folder = Path(out or cfg.out)
    final = run_training(cfg, out=folder, resume=resume, max_steps=max_steps, show=not quiet)
    console.print(f"checkpoint: {final}")


from mplus_fast.eval.cli import eval_app  # noqa: E402  (the evaluation wing: `mplus-fast eval TASK CKPT`)

app.add_typer(eval_app, name="eval")


if __name__ == "__main__":  # python -m mplus_fast.cli
    app()
