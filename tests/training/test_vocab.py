"""The tiny model's whole-word vocabulary: the fact lexicon is whole, other words are spelled,
the words come back, and the build is deterministic."""
from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")

from mplus_fast.training.facts import Fact, lexicon_words
from mplus_fast.training.vocab import EOS_ID, PAD_ID, Codec, train_word_tokenizer

TEXTS = ["It was a fine day, and Emma walked to the hall.", "Call me Ishmael. Some years ago, never mind how long."] * 5


def codec(size=400):
    return Codec(train_word_tokenizer(TEXTS, size, keep=lexicon_words()))


def test_the_lexicon_is_whole_and_answers_are_few_tokens():
    c = codec()
    fact = Fact("Mr. Knightley", "telescope", "painted", "wardrobe")
    assert len(c.encode(" " + fact.answer)) == 4                       # in the painted wardrobe
    assert len(c.encode(fact.statement)) == 11                         # Mr . Knightley keeps the telescope in the painted wardrobe .
    assert c.tok.token_to_id("<pad>") == PAD_ID and c.eos == EOS_ID


def test_rare_words_are_spelled_and_come_back():
    c = codec()
    text = "Ishmael walked, smiling, to the wardrobe."
    ids = c.encode(text)
    assert c.decode(ids) == text
    assert len(ids) > len(text.split()) + 3                            # "smiling" is spelled from characters
    assert c.tok.token_to_id("<unk>") not in ids


def test_a_character_the_books_never_use_is_unknown_and_the_build_repeats():
    c = codec()
    assert c.decode(c.encode("Emma ☃ walked")) == "Emma walked"      # documented loss: the word becomes <unk>
    assert codec().tok.to_str() == c.tok.to_str()


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size=50 is too small"):
        train_word_tokenizer(TEXTS, 50, keep=lexicon_words())


def test_random_read_back_draws_the_first_ids_or_the_lexicon():
    import random
    from types import SimpleNamespace

    from mplus_fast.training.data import SyntheticFacts
    c = codec()
    source = SyntheticFacts(SimpleNamespace(split="train", budget=12), c)
    ep = source.episode(random.Random(0), 3, 0, 0, random_distractors=True, random_tokens=5)
    ids = {i for inj in ep.injections for i in inj}
    assert ids <= set(range(3, 8)) and len(ids) == 5 and not ep.needed
    ep = source.episode(random.Random(0), 3, 0, 0, random_distractors=True)
    assert {i for inj in ep.injections for i in inj} <= set(source.lexicon)


def test_an_injection_can_hold_several_facts_each_asked_about():
    """`facts_per_injection`: every fact of a context is in its text and asked about once, the
    questions of an episode are distinct, and the context stays within the injection budget."""
    import random

    from mplus_fast.training.data import SyntheticFacts
    from mplus_fast.training.facts import FactSource, Prose
    c = codec()
    books = {"a": " ".join(TEXTS * 30)}
    source = SyntheticFacts(FactSource(Prose(books, c.count, "train"), "train", 64), c)
    ep = source.episode(random.Random(3), 3, 2, 0, facts_per_injection=4)
    assert len(ep.needed) == 8 and len(ep.fact_injections) == 2
    questions = [tuple(a.prompt) for _, a in ep.needed]
    assert len(set(questions)) == 8
    for i, ask in ep.needed:
        text = c.decode(ep.injections[i])
        answer = c.decode(ask.answer[:-1]).strip()
        assert answer in text, (answer, text)
        assert len(ep.injections[i]) <= 64
    assert all(len(inj) <= 64 for inj in ep.injections)
