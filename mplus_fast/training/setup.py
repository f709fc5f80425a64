"""Everything a run needs before its first step: the run folder, the tokenizer, the data source,
the initial model, and the retention monitor."""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mplus_fast.atomic import write_bytes_atomic
from mplus_fast.config import MPlusConfig
from mplus_fast.model import MPlus
from mplus_fast.training.config import TrainConfig, TrainConfigError
from mplus_fast.training.data import RecordSource, SyntheticFacts
from mplus_fast.training.facts import FactSource, Prose, draw_facts, lexicon_words
from mplus_fast.training.trainable import fresh_tensors
from mplus_fast.training.vocab import BOS_ID, EOS_ID, PAD_ID, Codec, load_tokenizer, train_tokenizer, train_word_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LEXICON_SAMPLES = 5000   # fact sentences added to the tokenizer's training text


@dataclass
class Setup:
    config: TrainConfig
    out: Path
    tokenizer_file: Path
    codec: Codec
    source: object                # SyntheticFacts or RecordSource
    dtype: torch.dtype
    num_tokens: int               # T of the model: every context must fit one injection
    monitor_fn: object = None

    @property
    def pad_id(self) -> int:
        pad = self.codec.tok.token_to_id("<pad>")
        return PAD_ID if pad is None else pad

    def monitor(self, model: MPlus) -> dict:
        return self.monitor_fn(model) if self.monitor_fn else {}


def _books():
    from mplus_fast.corpus import load_books
    return load_books()


def tokenizer_texts(books: dict[str, str], seed: int) -> list[str]:
    """The training split of the books plus sample fact sentences (so the lexicon is whole tokens)."""
    texts = list(Prose(books, lambda s: 0, "train").sentences)
    rng = random.Random(seed)
    for fact in (f for _ in range(LEXICON_SAMPLES) for f in draw_facts(rng, "train", 1)):
        texts.append(f"{fact.statement} {fact.question} {fact.answer}")
    return texts


def model_geometry(cfg: TrainConfig, codec: Codec) -> MPlusConfig:
    raw = {"architectures": ["MPlus"], **cfg.model.config, "vocab_size": codec.vocab_size,
           "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    try:
        return MPlusConfig.from_dict(raw)
    except ValueError as exc:
        raise TrainConfigError(f"{cfg.source or 'config'}: model.config: {exc}") from None


def _run_folder(cfg: TrainConfig, out, resume: bool) -> Path:
    folder = Path(out or cfg.out).expanduser()
    saved = folder / "config.toml"
    if resume:
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {folder} holds no run (no config.toml)")
        if saved.read_text(encoding="utf-8") != cfg.text:
            raise TrainConfigError(f"--resume: {saved} is not the config given; resume with the same config "
                                   "or start a new run folder")
    elif folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"run folder {folder} is not empty: pass --resume to continue it, or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_bytes_atomic(saved, cfg.text.encode("utf-8"))
    return folder


def prepare(cfg: TrainConfig, out=None, resume: bool = False) -> Setup:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    folder = _run_folder(cfg, out, resume)
    tok_file = folder / "tokenizer.json"
    books = None
    if not tok_file.is_file():
        if cfg.tokenizer.path:
            src = cfg.resolve(cfg.tokenizer.path)
            src = src / "tokenizer.json" if src.is_dir() else src
            if not src.is_file():
                raise FileNotFoundError(f"{cfg.source}: tokenizer.path: {src} not found")
            shutil.copyfile(src, tok_file)
        else:
            books = _books()
            texts = tokenizer_texts(books, cfg.seed)
            if cfg.tokenizer.kind == "word":
                tok = train_word_tokenizer(texts, cfg.tokenizer.vocab_size, keep=lexicon_words())
            else:
                tok = train_tokenizer(texts, cfg.tokenizer.vocab_size)
            write_bytes_atomic(tok_file, tok.to_str(pretty=False).encode("utf-8"))
    codec = Codec(load_tokenizer(tok_file))
    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.init == "scratch":
        T = model_geometry(cfg, codec).num_tokens
    else:
        T = MPlusConfig.from_file(cfg.resolve(cfg.model.init) / "config.json").num_tokens
    setup = Setup(cfg, folder, tok_file, codec, None, dtype, T)
    if cfg.data.kind == "synthetic":
        books = books or _books()
        setup.source = SyntheticFacts(FactSource(Prose(books, codec.count, "train"), "train", T), codec)
        if cfg.monitor.every:
            from mplus_fast.training.monitor import RetentionMonitor
            held = FactSource(Prose(books, codec.count, "held_out"), "held_out", T)
            setup.monitor_fn = RetentionMonitor(held, codec, cfg.monitor.facts, cfg.monitor.distances, cfg.seed)
    else:
        setup.source = RecordSource.from_jsonl(cfg.resolve(cfg.data.path), codec, max_context_tokens=4 * T)
    return setup


def build_model(setup: Setup) -> MPlus:
    """The first stage's model: a fresh one (geometry from the config) or a loaded checkpoint."""
    cfg = setup.config
    if cfg.model.init == "scratch":
        mc = model_geometry(cfg, setup.codec)
        gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        return MPlus(mc, fresh_tensors(mc, cfg.seed, cfg.model.init_std), backend="reference", dtype=setup.dtype,
                     seed=cfg.seed, generation_config=gen)
    path = cfg.resolve(cfg.model.init)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{cfg.source}: model.init: no checkpoint at {path}")
    return MPlus.from_pretrained(path, backend="reference", dtype=setup.dtype, seed=cfg.seed)
