"""The tiny model's own small vocabulary: a byte-level BPE trained on the training books.

Words outside the vocabulary are never lost: byte-level BPE spells any text from the learned
pieces, down to single bytes when nothing longer matches, so every string encodes and decodes
back exactly (there is no unknown token). The frequent words of the books and every word of the
fact lexicon are whole tokens (the lexicon is part of the training text), rare words take a few
pieces. Special tokens: `<pad>` 0, `<bos>` 1 (M+ has its own learned BOS, inputs never carry it),
`<eos>` 2 (ends every answer).

Needs the `tokenizers` package (pip install 'mplus_fast[tokenizer]').
"""
from __future__ import annotations

from pathlib import Path

SPECIAL = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("training needs the `tokenizers` package: pip install tokenizers "
                          "(or pip install 'mplus_fast[tokenizer]')") from None
    return tokenizers


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` tokens trained on `texts`
    (deterministic for the same texts: the trainer breaks ties by the pair itself)."""
    tk = _tokenizers()
    if vocab_size < 256 + len(SPECIAL) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (at least {256 + len(SPECIAL) + 1})")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def load_tokenizer(path: str | Path):
    tk = _tokenizers()
    path = Path(path)
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"tokenizer not found: {f}")
    return tk.Tokenizer.from_file(str(f))


class Codec:
    """Text ↔ ids for training (no special tokens added: M+ has its own BOS)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.token_to_id("<eos>")
        if self.eos is None:
            raise ValueError("the tokenizer has no <eos> token (needed to end answers)")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)
