"""Training configs: one TOML file = shared settings + one or more stages run in order.

    seed = 0                     # everything random follows from it (data, init, memory drops)
    threads = 2                  # torch CPU threads (results are bit-identical for the same count)
    out = "runs/tiny-mplus"      # run folder (relative to the working directory); --out overrides
    checkpoint_every = 500       # steps between checkpoints (and one at the end of every stage)
    log_every = 25

    [model]
    init = "scratch"             # "scratch" (geometry in [model.config]) or an upstream checkpoint folder
    trainable = ["backbone", "adapters", "retriever"]   # default: all for scratch, adapters + retriever otherwise
    dtype = "float32"            # compute dtype; bf16/fp16 train float32 master weights
    init_std = 0.02
    [model.config]               # config.json fields of a model trained from scratch (vocab_size: the tokenizer's)

    [tokenizer]
    path = "…/tokenizer.json"    # an existing tokenizer, or one trained on the training books:
    kind = "word"                # whole words, rarer ones spelled (`vocab.py`), or "bpe" (byte-level BPE)
    vocab_size = 512

    [data]
    kind = "synthetic"           # facts planted in the books (`facts.py`), or "jsonl" (`mplus_fast.qa` records)
    path = "train.jsonl"         # for kind = "jsonl"

    [monitor]                    # greedy retention on held-out facts, logged during training
    every = 1000
    facts = 50
    distances = [0, 8, 32]

    [[stage]]                    # see `Stage`
    name = "short"
    steps = 1000
    …

A later stage starts from the previous stage's final checkpoint; a config whose first stage must
start from another run's checkpoint says so with `model.init`. Every error names the file and the
field (e.g. `stage[2].lr`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mplus_fast.training.trainable import GROUPS


class TrainConfigError(ValueError):
    """A bad training config (the message names the file and the field)."""


@dataclass
class ModelSection:
    init: str = "scratch"
    trainable: list[str] | None = None
    dtype: str = "float32"
    init_std: float = 0.02
    config: dict = field(default_factory=dict)


@dataclass
class TokenizerSection:
    path: str | None = None
    kind: str = "bpe"
    vocab_size: int = 2048


@dataclass
class DataSection:
    kind: str = "synthetic"
    path: str | None = None


@dataclass
class MonitorSection:
    every: int = 0
    facts: int = 50
    distances: list[int] = field(default_factory=lambda: [0, 8, 32])


@dataclass
class Stage:
    """One stage of the curriculum (the authors': short contexts → several contexts with the
    retriever → the long-term memory on)."""
    name: str
    steps: int
    lr: float = 1e-3                 # backbone and adapters
    retriever_lr: float = 1e-3       # f_q / f_k (the authors give the selector its own rate)
    weight_decay: float = 0.0
    warmup: int = 50
    min_lr_ratio: float = 0.1        # cosine decay to lr × this
    grad_clip: float = 1.0
    accumulate: int = 8              # episodes per optimizer step (single-episode gradients are too noisy for Adam)
    injections: int = 4              # contexts written per step
    facts: int = 2                   # of which hold a fact asked about at the end of the step
    facts_per_injection: int = 1     # facts in each of those contexts (synthetic data), each asked about
    recall_questions: int = 0        # questions about facts of earlier steps…
    max_distance: int = 0            # …at distances `injections` … this (injections since the fact)
    retrieve: float = 1.0            # share of steps whose reads retrieve from the LTM (else STM only)
    stm_only_max_distance: int = 4   # STM-only steps ask only facts this close (farther ones are gone)
    qa_weight: float = 1.0
    continuation_weight: float = 0.0  # language-model loss on the text that follows the last injection
    continuation_tokens: int = 24
    continuation_prompt: int = 8      # tokens of a continuation / repeat row that choose the retrieved rows
    repeat_weight: float = 0.0        # loss on reading this step's contexts back from the memory
    repeats: int = 1                  # contexts read back per step (the newest ones within reach)
    distractors: str = "prose"        # "random": uniformly random tokens (only the memory predicts them)
    random_tokens: int = 0            # random distractors draw ids 3 … 2 + this (0: the fact lexicon's tokens)
    retriever_weight: float = 0.0     # BCE of the retrieval scores (0: the retriever is not trained)
    negative_weight: float = 1.0
    retriever_into_memory: bool = False  # the BCE also trains how the rows are written and the questions'
                                      # hidden states (co-training), not only f_q/f_k
    in_context: bool = False          # the lookup without the memory: each fact's context is put in its
                                      # question's prompt and nothing is written (a first stage that forms
                                      # the attention lookup at a batch that learns; docs/training.md)
    in_context_episode: bool = False  # in_context: every question read after ALL the episode's contexts, so
                                      # it must pick its fact out of `injections` (binding)
    fresh_memory: bool = False        # every episode starts from a memory of prose only (the memory filled with
                                      # training passages, as `ship` flushes it): the episode's fact is the
                                      # only one in the memory, as in the retention evaluation
    fresh_memory_every: int = 50      # steps between refills of that prose memory (its rows follow the writer)
    random_fact_age: float = 0.0      # share of retrieving reads before which the rows of the episode's facts are re-aged to a
                                      # uniformly random place in the retrieved block (oldest first; docs/training.md):
                                      # where they land then no longer tells the reader which rows hold the fact, as at
                                      # evaluation, where rows injected after the fact are younger and come after it
    random_fact_age_among: str = "retrieved"  # the rows that place is drawn among: "retrieved" (those the fact's
                                      # questions retrieve, found by a first read) or "bank" (every retrievable row)
    trainable: list[str] | None = None  # weight groups this stage trains (default: model.trainable); e.g.
                                      # ["retriever"]: f_q/f_k alone, on forward passes only (cheap)
    until_accuracy: float = 0.0       # 0: the stage is `steps` long. Else `steps` is its least length and it goes on, one log
                                      # window (`log_every` steps) at a time, until the answers' exact-match rate over a window
                                      # reaches this: when a circuit forms varies between CPUs (docs/training.md, "determinism")
    step_limit: int = 0               # until_accuracy: the stage never runs past this many steps

    def validate(self, where: str) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise TrainConfigError(f"{where}.{name}={getattr(self, name)!r} {why}")
        need(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        for name in ("steps", "injections", "accumulate", "facts_per_injection"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(0 <= self.facts <= self.injections, "facts", f"must be between 0 and injections={self.injections}")
        for name in ("lr", "retriever_lr"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name in ("weight_decay", "warmup", "grad_clip", "recall_questions", "qa_weight", "continuation_weight",
                     "retriever_weight", "negative_weight", "stm_only_max_distance", "repeat_weight", "repeats",
                     "random_tokens"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(0 <= self.retrieve <= 1, "retrieve", "must be a share between 0 and 1")
        need(self.fresh_memory_every >= 1, "fresh_memory_every", "must be at least 1")
        if self.fresh_memory:
            need(not self.recall_questions, "recall_questions",
                 "must be 0 when fresh_memory is on (earlier steps' facts are not in a fresh memory)")
            need(not self.in_context, "in_context", "must be off when fresh_memory is on (nothing would be written)")
        need(0 <= self.random_fact_age <= 1, "random_fact_age", "must be a share between 0 and 1")
        need(self.random_fact_age_among in ("retrieved", "bank"), "random_fact_age_among", 'must be "retrieved" or "bank"')
        if self.random_fact_age:
            need(self.retrieve > 0, "retrieve", "must be positive when random_fact_age is on (only retrieving reads use ages)")
            need(not self.in_context, "in_context", "must be off when random_fact_age is on (nothing is retrieved)")
        if self.in_context:
            need(self.facts >= 1, "facts", "must be at least 1 when in_context is on (only questions are read)")
            need(self.qa_weight > 0, "qa_weight", "must be positive when in_context is on (only questions are read)")
        if self.trainable is not None:
            need(bool(self.trainable) and all(g in GROUPS for g in self.trainable), "trainable",
                 f"must be a non-empty list of {list(GROUPS)}")
            if self.trainable == ["retriever"]:
                need(self.retriever_weight > 0, "retriever_weight", "must be positive when only the retriever trains")
        need(0 <= self.until_accuracy <= 1, "until_accuracy", "must be an exact-match rate between 0 and 1")
        if self.until_accuracy:
            need(self.step_limit >= self.steps, "step_limit",
                 f"must be at least steps={self.steps} when until_accuracy is on (the stage's longest length)")
            need(self.qa_weight > 0 and (self.facts >= 1 or self.recall_questions >= 1), "until_accuracy",
                 "needs questions to score (qa_weight > 0 and facts or recall_questions at least 1)")
        else:
            need(not self.step_limit, "step_limit", "is only for a stage with until_accuracy (its longest length)")
        need(self.distractors in ("prose", "random"), "distractors", "must be \"prose\" or \"random\"")
        need(0 < self.min_lr_ratio <= 1, "min_lr_ratio", "must be in (0, 1]")
        need(self.continuation_tokens >= 2, "continuation_tokens", "must be at least 2")
        need(1 <= self.continuation_prompt < self.continuation_tokens, "continuation_prompt",
             f"must be between 1 and continuation_tokens - 1 = {self.continuation_tokens - 1}")
        if self.recall_questions:
            need(self.max_distance >= self.injections, "max_distance",
                 f"must be at least injections={self.injections} when recall_questions > 0")
        need(self.qa_weight + self.continuation_weight + self.retriever_weight + self.repeat_weight > 0, "qa_weight",
             "and the other loss weights are all zero: nothing to train")


@dataclass
class TrainConfig:
    stages: list[Stage]
    seed: int = 0
    threads: int = 2
    out: str = "runs/train"
    checkpoint_every: int = 500
    log_every: int = 25
    keep_checkpoints: int = 2
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    source: Path | None = None        # the file it was read from (relative paths resolve against its folder)
    text: str = ""                    # the file's text, copied into the run folder

    def resolve(self, path: str) -> Path:
        """A path from the config: relative paths are relative to the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.source is None else (self.source.parent / p)


# ---------------------------------------------------------------------- loading
SECTIONS = {"model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection, "monitor": MonitorSection}
TOP = {"seed": int, "threads": int, "out": str, "checkpoint_every": int, "log_every": int, "keep_checkpoints": int}


def _typed(value, want, where: str):
    """Check a TOML value against a dataclass field type (ints are accepted for floats)."""
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool), dict: lambda v: isinstance(v, dict)}
    base = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}
    text = want if isinstance(want, str) else getattr(want, "__name__", str(want))
    optional = "None" in text
    if value is None and optional:
        return None
    if text.startswith("list"):
        if not isinstance(value, list):
            raise TrainConfigError(f"{where} must be a list, got {value!r}")
        inner = int if "int" in text else str
        for v in value:
            if not ok[inner](v):
                raise TrainConfigError(f"{where} must be a list of {inner.__name__}s, got {value!r}")
        return list(value)
    kind = next(b for name, b in base.items() if text.replace(" | None", "").strip() == name)
    if not ok[kind](value):
        raise TrainConfigError(f"{where} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _section(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where} must be a table, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise TrainConfigError(f"{where}: unknown field(s) {unknown} (expected some of {sorted(known)})")
    missing = [n for n, f in known.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and n not in raw]
    if missing:
        raise TrainConfigError(f"{where}: missing field(s) {missing}")
    return cls(**{k: _typed(v, known[k].type, f"{where}.{k}") for k, v in raw.items()})


def parse_config(raw: dict[str, Any], source: Path | None = None, text: str = "") -> TrainConfig:
    where = str(source) if source else "config"
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where}: expected a table of settings")
    allowed = set(TOP) | set(SECTIONS) | {"stage"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise TrainConfigError(f"{where}: unknown field(s) {unknown} (expected some of {sorted(allowed)})")
    kwargs: dict[str, Any] = {k: _typed(raw[k], t.__name__, f"{where}: {k}") for k, t in TOP.items() if k in raw}
    for name, cls in SECTIONS.items():
        if name in raw:
            kwargs[name] = _section(cls, raw[name], f"{where}: {name}")
    stages_raw = raw.get("stage")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise TrainConfigError(f"{where}: no [[stage]] given (at least one is needed)")
    stages = []
    for i, s in enumerate(stages_raw, start=1):
        stage = _section(Stage, s, f"{where}: stage[{i}]")
        stage.validate(f"{where}: stage[{i}]")
        stages.append(stage)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise TrainConfigError(f"{where}: stage names must be distinct, got {names}")
    cfg = TrainConfig(stages=stages, source=source, text=text, **kwargs)
    _validate(cfg, where)
    return cfg


def _validate(cfg: TrainConfig, where: str) -> None:
    for name in ("threads", "checkpoint_every", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < (0 if name == "threads" else 1):
            raise TrainConfigError(f"{where}: {name}={getattr(cfg, name)!r} must be {'>= 0' if name == 'threads' else 'at least 1'}")
    m = cfg.model
    if m.trainable is not None:
        bad = [g for g in m.trainable if g not in GROUPS]
        if bad or not m.trainable:
            raise TrainConfigError(f"{where}: model.trainable={m.trainable!r} must be a non-empty list of {list(GROUPS)}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise TrainConfigError(f"{where}: model.dtype={m.dtype!r} must be float32, bfloat16 or float16")
    if m.init == "scratch":
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in m.config:
                raise TrainConfigError(f"{where}: model.config.{key} is missing (needed to build a model from scratch)")
        if "vocab_size" in m.config:
            raise TrainConfigError(f"{where}: model.config.vocab_size is taken from the tokenizer; remove it")
    elif m.config:
        raise TrainConfigError(f"{where}: model.config is only for model.init = \"scratch\" (the checkpoint has its own)")
    if not m.init_std > 0:
        raise TrainConfigError(f"{where}: model.init_std={m.init_std!r} must be positive")
    if cfg.tokenizer.kind not in ("word", "bpe"):
        raise TrainConfigError(f"{where}: tokenizer.kind={cfg.tokenizer.kind!r} must be \"word\" or \"bpe\"")
    if cfg.data.kind not in ("synthetic", "jsonl"):
        raise TrainConfigError(f"{where}: data.kind={cfg.data.kind!r} must be \"synthetic\" or \"jsonl\"")
    if cfg.data.kind == "jsonl" and not cfg.data.path:
        raise TrainConfigError(f"{where}: data.path is needed for data.kind = \"jsonl\"")
    if cfg.tokenizer.path is None and m.init != "scratch":
        raise TrainConfigError(f"{where}: tokenizer.path is needed to fine-tune a checkpoint (its own tokenizer)")
    if cfg.monitor.every < 0 or cfg.monitor.facts < 1 or any(d < 0 for d in cfg.monitor.distances):
        raise TrainConfigError(f"{where}: monitor: every >= 0, facts >= 1 and distances >= 0 are needed")


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError("reading TOML configs on Python 3.10 needs the `tomli` package: pip install tomli") from None
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TrainConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(raw, path.resolve(), text)
