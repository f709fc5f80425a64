"""Tiny checkpoints with their own tokenizer.json for the evaluation tests.

`fact_ckpt`: a random M+ with T = 8, STM N = 32, R = 16, merging every 2 injections, and a
word-level tokenizer over a small fixed vocabulary (the checkpoint folder's own tokenizer).
`prose_ckpt`: the same geometry with a byte-level BPE tokenizer of 512 ids trained on a little
public-domain prose, for the tasks that read the books.
"""
from __future__ import annotations

import json

import pytest

from mplus_fast.testing import make_random_checkpoint

GEOMETRY = dict(num_tokens=8, num_blocks=6, num_ltm_blocks=2, ltm_initial_size=16, update_ltm_frequency=2,
                initial_rf_when_moving_stm_to_ltm=3, selector_hidden_dim=8)
WORDS = ("[UNK] [EOS] . ? the a an in of is was does did where what which who keep keeps kept key desk box red blue "
         "green garden house emma harriet knightley mr miss knows lives colour name dog cat called born town "
         "city bath london highbury answer question context paris rome").split()


def word_tokenizer_json(path, words=WORDS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, normalizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    tok.add_special_tokens(["[EOS]"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]"}))
    return path / "tokenizer.json"


def bpe_tokenizer_json(path, texts, vocab_size=512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


@pytest.fixture(scope="session")
def fact_ckpt(tmp_path_factory):
    pytest.importorskip("tokenizers")
    path = make_random_checkpoint(tmp_path_factory.mktemp("fact_ckpt"), seed=5, vocab_size=len(WORDS),
                                  eos_token_id=WORDS.index("[EOS]"), **GEOMETRY)
    word_tokenizer_json(path)
    return path


@pytest.fixture(scope="session")
def prose_ckpt(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from mplus_fast.eval.books import paragraphs
    path = make_random_checkpoint(tmp_path_factory.mktemp("prose_ckpt"), seed=6, vocab_size=512, eos_token_id=0,
                                  **GEOMETRY)
    bpe_tokenizer_json(path, paragraphs("emma")[:400] + paragraphs("mobydick")[:400])
    return path


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """These models are tiny: one thread is many times faster than several that wait for each
    other on a busy 2-core machine. Restored for the tests after this package."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
