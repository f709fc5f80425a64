"""`mplus-fast eval TASK CKPT`: one sub-command per task, thin over the task modules.

Every task compares M+, STM only and the borderline in one run, prints its tables, and with
`--out DIR` writes run.json / examples.jsonl / results.json and PNG plots there; a killed run
started again with the same --out continues where it stopped.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from mplus_fast.cliutil import CLIError, parse_dtype, set_threads, user_errors
from mplus_fast.corpus import CorpusError
from mplus_fast.eval.errors import MissingExtra

eval_app = typer.Typer(help="Evaluate a checkpoint: retention, longbench, niah, events, perplexity (M+ vs STM only vs borderline).",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

CKPT = typer.Argument(..., help="Checkpoint folder (config.json + safetensors; its tokenizer.json is used by default).")
TOKENIZER = typer.Option(None, help="tokenizer.json or a folder holding one, or 'llama3' (llama-models + tiktoken). "
                                    "Default: the checkpoint folder's.")
MODES = typer.Option("mplus,stm,borderline", help="Modes to compare: mplus (memory + retrieval), stm (retrieval off), "
                                                  "borderline (question alone, fresh memory).")
LIMIT = typer.Option(None, help="Evaluate only the first N examples (smoke runs).")
OUT = typer.Option(None, help="Run folder: run.json, examples.jsonl, results.json, plots. Re-running continues a killed run.")
RESTART = typer.Option(False, "--restart", help="Discard what --out holds and start over.")
NO_PLOTS = typer.Option(False, "--no-plots", help="Do not write PNG plots.")
QUIET = typer.Option(False, "--quiet", help="No progress bar.")
DEVICE = typer.Option("cpu", help="cpu, cuda, cuda:1, ...")
DTYPE = typer.Option(None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).")
BACKEND = typer.Option("fast", help="fast or reference.")
SEED = typer.Option(0, help="Seeds memory drops (per example) and built data sets.")
THREADS = typer.Option(0, help="torch CPU threads (0: torch's default).")


def eval_errors(fn):
    """`cliutil.user_errors`, plus the wing's own user errors (a missing extra, unfetchable books)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MissingExtra, CorpusError) as exc:
            raise CLIError(str(exc)) from None
    return user_errors(wrapper)


def _numbers(text: str, what: str, kind=int) -> list:
    """"0,8,32" → [0, 8, 32] (or floats), with a message naming the option."""
    try:
        values = [kind(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        example = "0,8,32" if kind is int else "0,0.5,1"
        raise CLIError(f"{what} {text!r}: expected comma-separated {kind.__name__}s, e.g. {example}") from None
    if not values:
        raise CLIError(f"{what} is empty")
    return values


def _modes(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _setup(ckpt: Path, tokenizer: Optional[str], device: str, dtype: Optional[str], backend: str, seed: int, threads: int):
    from mplus_fast.eval.session import ModelSource
    from mplus_fast.eval.tokenizer import load_tokenizer
    set_threads(threads)
    if not Path(ckpt).is_dir():
        raise CLIError(f"checkpoint folder not found: {ckpt}")
    tok = load_tokenizer(tokenizer, ckpt)
    source = ModelSource.from_pretrained(ckpt, device=device, dtype=parse_dtype(dtype), backend=backend, seed=seed)
    tok.check_model(source.config.vocab_size)
    return source, tok


def _finish(result: dict, tables, plot_fn, out: Optional[Path], no_plots: bool) -> None:
    from mplus_fast.eval.report import console, print_tables
    print_tables(tables)
    if out is not None:
        console.print(f"results: {out / 'results.json'}")
        if not no_plots:
            for p in plot_fn(result, out):
                console.print(f"plot: {p}")


@eval_app.command()
@eval_errors
def retention(
    ckpt: Path = CKPT,
    data: str = typer.Option(..., help="A qa.py JSONL file, a folder with the authors' SQuAD/NQ files, or books[:N] "
                                       "(N facts planted in Austen / Moby-Dick prose)."),
    distances: str = typer.Option("0,1,2,4,8", help="Distractor injections between the fact and the question."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Answer tokens (default 16; 10 for the authors' sets)."),
    postprocess: Optional[str] = typer.Option(None, help="Answer cut before scoring: first-line, first-sentence, none "
                                                         "(default first-line; none for the authors' sets)."),
    chunk_tokens: Optional[int] = typer.Option(None, help="Tokens per injection (default: the model's T; 512 for the authors' sets)."),
    question_template: str = typer.Option("{question}", help="Prompt around the question."),
    context_template: str = typer.Option("{context}", help="Text around the context before injection."),
    no_location: bool = typer.Option(False, "--no-location", help="Skip locating the fact's rows (a memory snapshot per "
                                                                  "question; costly at the released size). recall@R is then over all questions."),
    modes: str = MODES, tokenizer: Optional[str] = TOKENIZER, limit: Optional[int] = LIMIT, out: Optional[Path] = OUT,
    restart: bool = RESTART, no_plots: bool = NO_PLOTS, quiet: bool = QUIET, device: str = DEVICE,
    dtype: Optional[str] = DTYPE, backend: str = BACKEND, seed: int = SEED, threads: int = THREADS,
):
    """Knowledge retention vs distance, with recall@R of the fact's injection by layer."""
    from mplus_fast.eval import plots, report
    from mplus_fast.eval import retention as task
    from mplus_fast.eval.data import load_retention_data
    source, tok = _setup(ckpt, tokenizer, device, dtype, backend, seed, threads)
    dist = _numbers(distances, "--distances")
    ds = load_retention_data(data, tok, max_distance=max(dist), seed=seed)
    given = {"max_new_tokens": max_new_tokens, "postprocess": postprocess, "chunk_tokens": chunk_tokens}
    settings = task.Settings(distances=tuple(dist), modes=_modes(modes), question_template=question_template,
                             context_template=context_template, locate=not no_location,
                             **{**ds.preset, **{k: v for k, v in given.items() if v is not None}})
    result = task.run(source, tok, ds.records, settings, distractors=ds.distractors, data=ds.description, out=out,
                      limit=limit, restart=restart, progress=not quiet)
    _finish(result, report.retention_tables(result), plots.retention_plots, out, no_plots)


@eval_app.command("facts")
@eval_errors
def build_facts(
    out: Path = typer.Argument(..., help="JSONL file to write (the qa.py format)."),
    n: int = typer.Option(200, help="Facts to plant."),
    distractor_tokens: int = typer.Option(0, help="Also write about this many whitespace words of other-book prose "
                                                  "as each record's distractors (0: none; `eval retention --data books` "
                                                  "draws them itself)."),
    seed: int = SEED,
):
    """Write the offline retention set: facts planted in Austen / Moby-Dick prose (qa.py JSONL)."""
    from mplus_fast.eval.books import BookDistractors, planted_facts
    from mplus_fast.qa import write_jsonl
    if n < 1:
        raise CLIError(f"--n {n} must be positive")
    records = planted_facts(n, seed)
    if distractor_tokens > 0:
        source = BookDistractors(seed)
        for i, r in enumerate(records):
            words, texts = 0, []
            for t in source.texts(i, r):
                texts.append(t)
                words += len(t.split())
                if words >= distractor_tokens:
                    break
            r.distractors = texts
    path = write_jsonl(out, records)
    typer.echo(f"wrote {len(records)} planted facts to {path}")


@eval_app.command()
@eval_errors
def longbench(
    ckpt: Path = CKPT,
    data: Path = typer.Option(..., help="A LongBench <dataset>.jsonl file, or a folder of them (THUDM/LongBench's data files)."),
    datasets: Optional[str] = typer.Option(None, help="Comma-separated datasets to run (default: every file in --data)."),
    split: str = typer.Option("context", help="context: inject the prompt up to its {context}, read the rest; "
                                              "tail: the authors' script (read the last --read-tokens, inject the rest)."),
    postprocess: str = typer.Option("official", help="Scores shown first: official (LongBench: first line for trec, triviaqa, "
                                                     "samsum, lsht), first-line, first-sentence, none. All four are in results.json."),
    chunk_tokens: int = typer.Option(0, help="Tokens per injection (0: the model's T; the authors use 512)."),
    read_tokens: int = typer.Option(0, help="With --split tail: tokens read (0: 512 - the generation length)."),
    max_length: int = typer.Option(0, help="Cut the context in the middle to fit this many prompt tokens (0: no cut)."),
    max_new_tokens: int = typer.Option(0, help="Answer tokens (0: the dataset's official length)."),
    modes: str = MODES, tokenizer: Optional[str] = TOKENIZER,
    limit: Optional[int] = typer.Option(None, help="Only the first N examples of each dataset."), out: Optional[Path] = OUT,
    restart: bool = RESTART, no_plots: bool = NO_PLOTS, quiet: bool = QUIET, device: str = DEVICE,
    dtype: Optional[str] = DTYPE, backend: str = BACKEND, seed: int = SEED, threads: int = THREADS,
):
    """LongBench with the official prompts, lengths and metrics; the context in memory, the question read after."""
    from mplus_fast.eval import longbench as task, plots, report
    names = [d.strip() for d in datasets.split(",")] if datasets else None
    unknown = [d for d in names or [] if d not in task.datasets()]
    if unknown:
        raise CLIError(f"unknown LongBench dataset(s) {unknown}: choose from {', '.join(sorted(task.datasets()))}")
    settings = task.Settings(modes=_modes(modes), split=split, chunk_tokens=chunk_tokens, read_tokens=read_tokens,
                             max_length=max_length, postprocess=postprocess, max_new_tokens=max_new_tokens)
    examples = task.load_examples(data, names)
    source, tok = _setup(ckpt, tokenizer, device, dtype, backend, seed, threads)
    result = task.run(source, tok, examples, settings, data={"path": str(Path(data).resolve()), "datasets": names},
                      out=out, limit=limit, restart=restart, progress=not quiet)
    _finish(result, report.longbench_tables(result), plots.longbench_plots, out, no_plots)


@eval_app.command()
@eval_errors
def niah(
    ckpt: Path = CKPT,
    lengths: str = typer.Option("256,1024,4096", help="Haystack lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="Needle depths (0: start, 1: end)."),
    samples: int = typer.Option(2, help="Haystacks per (length, depth) cell."),
    chunk_tokens: int = typer.Option(0, help="Tokens per injection (0: the model's T)."),
    max_new_tokens: int = typer.Option(8, help="Answer tokens."),
    no_location: bool = typer.Option(False, "--no-location", help="Skip locating the needle's rows (costly at the released size)."),
    modes: str = MODES, tokenizer: Optional[str] = TOKENIZER,
    limit: Optional[int] = typer.Option(None, help="Only the first N cells of the grid."), out: Optional[Path] = OUT,
    restart: bool = RESTART, no_plots: bool = NO_PLOTS, quiet: bool = QUIET, device: str = DEVICE,
    dtype: Optional[str] = DTYPE, backend: str = BACKEND, seed: int = SEED, threads: int = THREADS,
):
    """Needle in a haystack of book prose over a depth × length grid (heat map per mode)."""
    from mplus_fast.eval import niah as task, plots, report
    settings = task.Settings(lengths=tuple(_numbers(lengths, "--lengths")), depths=tuple(_numbers(depths, "--depths", float)),
                             samples=samples, modes=_modes(modes), chunk_tokens=chunk_tokens,
                             max_new_tokens=max_new_tokens, locate=not no_location)
    source, tok = _setup(ckpt, tokenizer, device, dtype, backend, seed, threads)
    result = task.run(source, tok, settings, seed=seed, out=out, limit=limit, restart=restart, progress=not quiet)
    _finish(result, report.niah_tables(result), plots.niah_plots, out, no_plots)


@eval_app.command()
@eval_errors
def events(
    ckpt: Path = CKPT,
    n: int = typer.Option(50, help="Questions."),
    length: int = typer.Option(2048, help="Tokens of prose the event is planted in."),
    chunk_tokens: int = typer.Option(0, help="Tokens per injection (0: the model's T)."),
    no_location: bool = typer.Option(False, "--no-location", help="Skip locating the event's rows."),
    modes: str = MODES, tokenizer: Optional[str] = TOKENIZER,
    limit: Optional[int] = typer.Option(None, help="Same as --n (smoke runs)."), out: Optional[Path] = OUT,
    restart: bool = RESTART, no_plots: bool = NO_PLOTS, quiet: bool = QUIET, device: str = DEVICE,
    dtype: Optional[str] = DTYPE, backend: str = BACKEND, seed: int = SEED, threads: int = THREADS,
):
    """Planted-event multiple choice over a long book passage (LongBook style), scored by option log-likelihood."""
    from mplus_fast.eval import events as task, plots, report
    settings = task.Settings(length=length, modes=_modes(modes), chunk_tokens=chunk_tokens, locate=not no_location)
    source, tok = _setup(ckpt, tokenizer, device, dtype, backend, seed, threads)
    result = task.run(source, tok, min(n, limit) if limit else n, settings, seed=seed, out=out, restart=restart,
                      progress=not quiet)
    _finish(result, report.events_tables(result), lambda r, o: plots.bars(r, o, "acc", "accuracy (%)"), out, no_plots)


@eval_app.command()
@eval_errors
def perplexity(
    ckpt: Path = CKPT,
    n: int = typer.Option(20, help="Held-out passages."),
    memory_tokens: int = typer.Option(1024, help="Tokens of the preceding text injected into the memory."),
    eval_tokens: int = typer.Option(128, help="Held-out tokens read and scored."),
    chunk_tokens: int = typer.Option(0, help="Tokens per injection (0: the model's T)."),
    modes: str = MODES, tokenizer: Optional[str] = TOKENIZER,
    limit: Optional[int] = typer.Option(None, help="Same as --n (smoke runs)."), out: Optional[Path] = OUT,
    restart: bool = RESTART, no_plots: bool = NO_PLOTS, quiet: bool = QUIET, device: str = DEVICE,
    dtype: Optional[str] = DTYPE, backend: str = BACKEND, seed: int = SEED, threads: int = THREADS,
):
    """Perplexity of held-out prose with the memory of the text before it (M+, STM only) and without (borderline)."""
    from mplus_fast.eval import perplexity as task, plots, report
    settings = task.Settings(memory_tokens=memory_tokens, eval_tokens=eval_tokens, modes=_modes(modes),
                             chunk_tokens=chunk_tokens)
    source, tok = _setup(ckpt, tokenizer, device, dtype, backend, seed, threads)
    result = task.run(source, tok, min(n, limit) if limit else n, settings, seed=seed, out=out, restart=restart,
                      progress=not quiet)
    _finish(result, report.perplexity_tables(result), lambda r, o: plots.bars(r, o, "ppl", "perplexity"), out, no_plots)


@eval_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@eval_errors
def harness(ctx: typer.Context):
    """lm-evaluation-harness with the model `mplus_fast` registered: every argument goes to lm_eval, e.g.
    --model mplus_fast --model_args pretrained=CKPT,inject_document=true --tasks TASK."""
    try:
        from mplus_fast.eval.harness import main
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    main(list(ctx.args))
