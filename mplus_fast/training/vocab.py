"""The tiny model's own small vocabulary, two kinds (`tokenizer.kind` in a training config):

- `"word"` (the shipped tiny model): whole words. Every word of the fact lexicon and the most
  frequent words of the training books are single tokens; any other word is spelled from single
  characters (a WordPiece vocabulary whose only pieces are the characters of the books, `x` and
  `##x`). A fact is then a handful of tokens and its answer set is 24 + 30 tokens. What it
  loses: whitespace (text is split on spaces and punctuation; decoding joins words with one
  space and re-attaches the usual punctuation, `desk .` → `desk.`), and a word holding a
  character the books never use becomes `<unk>`. The words themselves always come back.
- `"bpe"`: a byte-level BPE trained on the training books; every text encodes and decodes back
  exactly (down to single bytes, no unknown token).

Special tokens: `<pad>` 0, `<bos>` 1 (M+ has its own learned BOS, inputs never carry it),
`<eos>` 2 (ends every answer), and for `"word"` `<unk>` 3.

Needs the `tokenizers` package (pip install 'mplus_fast[tokenizer]').
"""
from __future__ import annotations

from pathlib import Path

SPECIAL = ("<pad>", "<bos>", "<eos>")
UNK = "<unk>"
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


def train_word_tokenizer(texts: list[str], vocab_size: int, keep: tuple[str, ...] = ()):
    """A whole-word `tokenizers.Tokenizer` of `vocab_size` tokens: the special tokens, every
    character of `texts` (alone and as a `##` continuation), the words of `keep` (the fact
    lexicon, always whole), then the most frequent words of `texts` (ties broken by the word:
    deterministic)."""
    import collections
    tk = _tokenizers()
    split = tk.pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(w for w, _ in split.pre_tokenize_str(text))
    chars = sorted({ch for w in counts for ch in w})
    vocab: dict[str, int] = {}
    for piece in [*SPECIAL, UNK, *chars, *(f"##{ch}" for ch in chars)]:
        vocab.setdefault(piece, len(vocab))
    for w, _ in split.pre_tokenize_str(" ".join(keep)):
        vocab.setdefault(w, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is too small: the characters and the kept words already take {len(vocab)}")
    for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    tok = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.pre_tokenizer = split
    tok.decoder = tk.decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([*SPECIAL, UNK])
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
