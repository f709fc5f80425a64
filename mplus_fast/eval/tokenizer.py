"""Text ↔ token ids for the evaluation tasks: one small interface over three sources.

- a checkpoint folder's own tokenizer: `tokenizer.json` read with `tokenizers`, or, when the
  folder has only a `tokenizer_config.json` (a SentencePiece model, say), `transformers`'
  `AutoTokenizer` from the local files;
- any `tokenizer.json` file or folder given by path;
- `"llama3"`: the Llama-3 tokenizer that PyPI's `llama-models` package ships
  (`llama_models/llama3/tokenizer.model`), read with `tiktoken` — the released M+ vocabulary,
  used by the tests without vendoring the file.

Text is always encoded WITHOUT special tokens: M+ prepends its own learned BOS (SPEC §2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LLAMA3 = "llama3"
# Llama 3's pre-tokenizer split pattern and special tokens (from Meta's published tokenizer).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                 "<|eot_id|>", "<|python_tag|>"]


class TokenizerError(ValueError):
    """No tokenizer could be loaded (the message says what is missing and how to get it)."""


@dataclass
class TextTokenizer:
    """`encode(text) -> ids` (no special tokens), `decode(ids) -> text` (special tokens dropped)."""
    name: str
    _encode: Callable[[str], list[int]]
    _decode: Callable[[list[int]], str]
    vocab_size: int
    eos_ids: list[int] = field(default_factory=list)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    def check_model(self, vocab_size: int) -> None:
        """A tokenizer whose ids the model cannot embed is refused before anything runs."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"tokenizer {self.name} has {self.vocab_size} ids but the model's vocabulary has "
                                 f"{vocab_size}: they do not belong together")


def load_tokenizer(spec: str | Path | None, checkpoint: str | Path | None = None) -> TextTokenizer:
    """`spec`: "llama3", a tokenizer.json / folder, or None for the checkpoint folder's own."""
    if spec is not None and str(spec) == LLAMA3:
        return llama3_tokenizer()
    path = Path(spec) if spec is not None else Path(checkpoint) if checkpoint is not None else None
    if path is None:
        raise TokenizerError("no tokenizer: give --tokenizer (a tokenizer.json, a folder, or 'llama3')")
    if path.is_file():
        return _from_tokenizer_json(path)
    if (path / "tokenizer.json").is_file():
        return _from_tokenizer_json(path / "tokenizer.json")
    if (path / "tokenizer_config.json").is_file():
        return _from_transformers(path)
    where = "the checkpoint folder" if spec is None else "the tokenizer path"
    raise TokenizerError(f"no tokenizer found in {where} {path} (expected tokenizer.json or tokenizer_config.json); "
                         "give --tokenizer PATH or --tokenizer llama3")


def _from_tokenizer_json(path: Path) -> TextTokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("reading tokenizer.json needs the `tokenizers` package: pip install 'mplus_fast[eval]'") from None
    tok = Tokenizer.from_file(str(path))
    eos = _eos_from_config(path.parent, tok.token_to_id)
    return TextTokenizer(str(path), lambda t: tok.encode(t, add_special_tokens=False).ids,
                         lambda ids: tok.decode(ids, skip_special_tokens=True), tok.get_vocab_size(with_added_tokens=True), eos)


def _eos_from_config(folder: Path, token_to_id) -> list[int]:
    """The eos token named by a tokenizer_config.json / special_tokens_map.json beside the file."""
    import json
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and token_to_id(eos) is not None:
                return [token_to_id(eos)]
    return []


def _from_transformers(folder: Path) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"{folder} holds a tokenizer_config.json without tokenizer.json: reading it needs "
                             "`transformers` (pip install transformers)") from None
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return TextTokenizer(str(folder), lambda t: tok.encode(t, add_special_tokens=False),
                         lambda ids: tok.decode(ids, skip_special_tokens=True), len(tok), eos)


def llama3_model_file() -> Path:
    """`tokenizer.model` of the installed `llama-models` package."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("llama_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the Llama-3 tokenizer comes from the `llama-models` package: pip install llama-models tiktoken")
    for root in spec.submodule_search_locations:
        for candidate in sorted(Path(root).glob("llama3*/**/tokenizer.model")):
            return candidate
    raise TokenizerError("llama-models is installed but ships no llama3 tokenizer.model")


def llama3_tokenizer() -> TextTokenizer:
    """The Llama-3 (and 3.1) tokenizer: 128,000 BPE ranks + 256 special tokens, eos <|end_of_text|>."""
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        raise TokenizerError("the Llama-3 tokenizer is read with `tiktoken`: pip install tiktoken llama-models") from None
    ranks = load_tiktoken_bpe(str(llama3_model_file()))
    n = len(ranks)
    names = _LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(_LLAMA3_NAMED) + 2)]
    specials = {name: n + i for i, name in enumerate(names)}
    enc = tiktoken.Encoding(name="llama3", pat_str=_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    special_ids = set(specials.values())
    decode = lambda ids: enc.decode([i for i in ids if i not in special_ids])
    return TextTokenizer(LLAMA3, lambda t: enc.encode(t, disallowed_special=()), decode, n + len(specials),
                         [specials["<|end_of_text|>"], specials["<|eot_id|>"]])
