"""LongBench (v1) over a user's local JSONL files, with the official prompts, generation lengths
and metrics per dataset (`longbench.json`, taken from THUDM/LongBench's config and eval.py).

Each example's prompt is the dataset's template filled with its `context` and `input`. Split
(`split`):
- `context` (default): the template up to and including {context} is injected into the memory
  chunk by chunk (`chunk_tokens`, default T), and the rest (the question and its instruction) is
  the prompt that is read and answered;
- `tail`: the authors' MemoryLLM script: the whole prompt is tokenized, its last `read_tokens`
  (default 512 − the generation length) are read, everything before is injected in chunks of
  `chunk_tokens` (they use 512).
Modes: `mplus` / `stm` read the prompt over that memory (retrieval on / off); `borderline`
reads the same prompt on a fresh memory (no context at all).
`max_length` > 0 cuts the context part in the middle to fit (LongBench's own truncation);
0 keeps it all (the memory has no window).
Scores: the dataset's metric (QA-F1, ROUGE-L, classification accuracy, retrieval, count, code
similarity), best over the accepted answers, in percent, under every answer post-processing at
once: `official` (LongBench: the first line for trec, triviaqa, samsum and lsht, else the raw
generation), `first-line`, `first-sentence`, `none`. `postprocess` picks the one shown first.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from mplus_fast.eval import metrics
from mplus_fast.eval.errors import MissingExtra
from mplus_fast.eval.runner import failed_keys, finish, mean, prepare, run_examples
from mplus_fast.eval.session import MODE_LABELS, ModelSource, ask, check_modes, inject_text
from mplus_fast.qa import QAFormatError, json_lines

TASK = "longbench"
POSTPROCESS = ("official", "first-line", "first-sentence", "none")
SPLITS = ("context", "tail")


@lru_cache(maxsize=1)
def config() -> dict:
    return json.loads((Path(__file__).with_name("longbench.json")).read_text(encoding="utf-8"))


def datasets() -> dict:
    return config()["datasets"]


METRIC_FNS = {
    "qa_f1": metrics.qa_f1, "qa_f1_zh": metrics.qa_f1_zh, "rouge": metrics.rouge_l, "rouge_zh": metrics.rouge_l_zh,
    "classification": metrics.classification_score, "retrieval": metrics.retrieval_score,
    "retrieval_zh": metrics.retrieval_zh_score, "count": metrics.count_score, "code_sim": metrics.code_sim_score,
}


def postprocessed(dataset: str, text: str, how: str) -> str:
    if how == "official":
        return metrics.first_line(text) if dataset in config()["first_line_datasets"] else text
    return metrics.postprocess(text, how)


def score(dataset: str, prediction: str, answers: list[str], all_classes) -> float:
    """LongBench's score of one prediction in [0, 1]: the best over the accepted answers."""
    fn = METRIC_FNS[datasets()[dataset]["metric"]]
    kw = {"all_classes": all_classes or []} if fn is metrics.classification_score else {}
    return metrics.best(fn, prediction, answers, **kw)


@dataclass
class Settings:
    modes: tuple[str, ...] = ("mplus", "stm", "borderline")
    split: str = "context"
    chunk_tokens: int = 0            # 0: the model's T
    read_tokens: int = 0             # tail split: 0 means 512 - max_new_tokens
    max_length: int = 0              # 0: no truncation
    postprocess: str = "official"
    max_new_tokens: int = 0          # 0: the dataset's official length

    def __post_init__(self):
        self.modes = check_modes(self.modes)
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {list(SPLITS)}")
        if self.postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess {self.postprocess!r} is not one of {list(POSTPROCESS)}")
        for name in ("chunk_tokens", "read_tokens", "max_length", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")


# ---------------------------------------------------------------------- data
def load_examples(path: str | Path, names: list[str] | None = None) -> list[tuple[str, dict]]:
    """(dataset, example) pairs from a LongBench file or a folder of `<dataset>.jsonl` files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.stem in datasets() or p.stem.removesuffix("_e") in datasets())
        if names:
            missing = [n for n in names if not (path / f"{n}.jsonl").is_file()]
            if missing:
                raise FileNotFoundError(f"{path}: no {', '.join(m + '.jsonl' for m in missing)}")
            files = [path / f"{n}.jsonl" for n in names]
        if not files:
            raise FileNotFoundError(f"{path} holds no LongBench file (<dataset>.jsonl, dataset one of {sorted(datasets())})")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"data not found: {path}")
    out = []
    for f in files:
        out += [(_dataset_of(f, obj, where), obj) for where, obj in _records(f)]
    return out


def _records(path: Path):
    for where, obj in json_lines(path):
        if not isinstance(obj, dict):
            raise QAFormatError(f"{where}: expected a JSON object")
        for field in ("context", "input", "answers"):
            if field not in obj:
                raise QAFormatError(f"{where}: missing field {field!r} (a LongBench record has input, context, answers)")
        if not isinstance(obj["answers"], list) or not all(isinstance(a, str) for a in obj["answers"]):
            raise QAFormatError(f"{where}: field 'answers' must be a list of strings")
        obj.setdefault("_id", f"{path.stem}-{where.rsplit(':', 1)[1]}")
        yield where, obj


def _dataset_of(path: Path, obj: dict, where: str) -> str:
    name = obj.get("dataset") or path.stem
    name = name.removesuffix("_e")   # LongBench-E files use the same prompts
    if name not in datasets():
        raise QAFormatError(f"{where}: unknown LongBench dataset {name!r} (known: {', '.join(sorted(datasets()))})")
    return name


# ---------------------------------------------------------------------- one example
def split_prompt(dataset: str, ex: dict, tokenizer, s: Settings, max_new: int) -> tuple[list[int], list[int]]:
    """(ids to inject, ids to read) for one example."""
    template = datasets()[dataset]["prompt"]
    head, tail = template.split("{context}", 1)
    fill = lambda t: t.replace("{input}", ex["input"])   # LongBench's str.format, without tripping on braces
    context = tokenizer.encode(head.replace("{input}", ex["input"]) + ex["context"])
    read = tokenizer.encode(fill(tail))
    if s.max_length and len(context) + len(read) > s.max_length:
        keep = max(s.max_length - len(read), 0)
        context = context[: keep // 2] + context[len(context) - (keep - keep // 2):]
    if s.split == "context":
        return context, read
    whole = context + read
    n_read = s.read_tokens or max(512 - max_new, 1)
    return whole[:-n_read], whole[-n_read:]


def run_example(source: ModelSource, tokenizer, index: int, dataset: str, ex: dict, s: Settings,
                modes: tuple[str, ...]) -> dict:
    cfg = datasets()[dataset]
    max_new = s.max_new_tokens or cfg["max_new_tokens"]
    inject_ids, read_ids = split_prompt(dataset, ex, tokenizer, s, max_new)
    model = source.fresh(index)
    kw = dict(max_new_tokens=max_new, eos_ids=tokenizer.eos_ids)
    out = {"key": f"{index}:{ex['_id']}", "index": index, "dataset": dataset, "length": ex.get("length"),
           "inject_tokens": len(inject_ids), "read_tokens": len(read_ids)}
    answers = {}
    if "borderline" in modes:
        answers["borderline"] = ask(model, read_ids, tokenizer, mode="borderline", **kw).text
    out["injections"] = len(inject_text(model, inject_ids, s.chunk_tokens))
    for mode in (m for m in modes if m != "borderline"):
        answers[mode] = ask(model, read_ids, tokenizer, mode=mode, **kw).text
    out["predictions"] = answers
    out["scores"] = {mode: {how: round(score(dataset, postprocessed(dataset, text, how), ex["answers"], ex.get("all_classes")), 4)
                            for how in POSTPROCESS} for mode, text in answers.items()}
    return out


# ---------------------------------------------------------------------- the run
def run(source: ModelSource, tokenizer, examples: list[tuple[str, dict]], settings: Settings | None = None, *,
        data: dict | None = None, out=None, limit: int | None = None, restart: bool = False, progress: bool = True) -> dict:
    """`limit` applies per dataset (the first N examples of each)."""
    s = settings or Settings()
    if not examples:
        raise ValueError("no LongBench examples to evaluate")
    _check_extras({d for d, _ in examples})
    store, modes = prepare(source, tokenizer, TASK, {**asdict(s), "data": data or {}}, s.modes, out, restart)
    seen: dict[str, int] = {}
    todo = []
    for i, (dataset, ex) in enumerate(examples):
        seen[dataset] = seen.get(dataset, 0) + 1
        if limit is None or seen[dataset] <= limit:
            todo.append((i, f"{i}:{ex['_id']}", (source, tokenizer, i, dataset, ex, s, modes)))
    started = time.perf_counter()
    running = lambda rec: {MODE_LABELS[m]: rec["scores"][m][s.postprocess] for m in modes}
    records = run_examples(todo, run_example, store, "longbench", running, progress)
    return finish(store, summarize(records, s, modes), records, started)


def _check_extras(names: set[str]) -> None:
    if any(datasets()[n]["metric"].endswith("_zh") for n in names):
        try:
            import jieba  # noqa: F401
        except ImportError:
            raise MissingExtra("the Chinese LongBench datasets are scored with `jieba`: pip install jieba") from None


def summarize(records: list[dict], s: Settings, modes: tuple[str, ...]) -> dict:
    ok = [r for r in records if "error" not in r]
    by = {}
    for dataset in sorted({r["dataset"] for r in ok}):
        rs = [r for r in ok if r["dataset"] == dataset]
        by[dataset] = {"n": len(rs), "metric": datasets()[dataset]["metric"],
                       "inject_tokens_mean": mean(r["inject_tokens"] for r in rs),
                       **{m: {how: _pct(mean(r["scores"][m][how] for r in rs)) for how in POSTPROCESS} for m in modes}}
    average = {m: {how: _pct(mean(v[m][how] / 100 for v in by.values())) for how in POSTPROCESS} for m in modes} if by else {}
    return {"examples": len(ok), "failed": failed_keys(records), "postprocess": s.postprocess, "by_dataset": by,
            "average": average}


def _pct(x):
    return None if x is None else round(100 * x, 2)
