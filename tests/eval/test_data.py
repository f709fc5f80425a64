"""Data sources: the Llama-3 tokenizer from llama-models, the authors' SQuAD / NQ layout (tiny
files written here), the planted book facts, haystacks."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from mplus_fast.eval import authors, books
from mplus_fast.eval.data import load_retention_data
from mplus_fast.eval.tokenizer import TextTokenizer, TokenizerError, load_tokenizer
from mplus_fast.qa import QAFormatError

WORDS = TextTokenizer("spaces", lambda t: list(range(len(t.split()))), lambda ids: " ".join("w" for _ in ids), 10**6)


def test_llama3_tokenizer_from_llama_models():
    pytest.importorskip("tiktoken")
    pytest.importorskip("llama_models")
    tok = load_tokenizer("llama3")
    assert tok.vocab_size == 128_256 and tok.eos_ids == [128_001, 128_009]
    ids = tok.encode("Hello world! M+ remembers 160k tokens.")
    assert ids[:2] == [9906, 1917] and tok.decode(ids) == "Hello world! M+ remembers 160k tokens."
    assert 128_000 not in ids, "no BOS: M+ has its own"
    assert tok.encode("<|end_of_text|>") != [128_001], "special-token text is plain text"
    with pytest.raises(TokenizerError, match="128256 ids but the model's vocabulary has 96"):
        tok.check_model(96)


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer found in the checkpoint folder"):
        load_tokenizer(None, tmp_path)


# ---------------------------------------------------------------------- the authors' layout
def squad_file(path, articles):
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": t, "paragraphs": ps} for t, ps in articles]}))


def make_squad(folder):
    folder.mkdir()
    dev = [("A", [{"context": "Emma lives in Highbury.", "qas": [
        {"id": "q1", "question": "Where does Emma live?", "answers": [{"text": "Highbury", "answer_start": 14}], "is_impossible": False},
        {"id": "q2", "question": "Who is the king?", "answers": [], "is_impossible": True}]}]),
           ("B", [{"context": "The desk is red.", "qas": [
               {"id": "q3", "question": "What colour is the desk?", "answers": [{"text": "red", "answer_start": 12}], "is_impossible": False}]}])]
    squad_file(folder / "dev-v2.0.json", dev)
    train = [("T", [{"context": " ".join(["word"] * 500) + f" para{i}", "qas": []} for i in range(6)])]
    squad_file(folder / "train-v2.0.json", train)
    np.save(folder / "indices_squad_3.npy", np.array([1, 0]))
    return folder


def test_squad_layout_in_the_authors_order_and_prompts(tmp_path):
    s = authors.load(make_squad(tmp_path / "squad"))
    assert s.name == "squad" and [r.id for r in s.records] == ["q3", "q1"]      # the indices file orders them
    assert s.records[1].context == "Context: Emma lives in Highbury."
    assert s.records[1].question == "Questions: Where does Emma live? Answer:" and s.records[1].answers == ["Highbury"]
    # unrelated contexts: paragraphs joined while shorter than 768 tokens, then cut to 512 tokens
    pieces = s.unrelated_contexts(WORDS, 2)
    assert len(pieces) == 2 and all(p.split() == ["w"] * 512 for p in pieces)
    with pytest.raises(ValueError, match="only 3 unrelated contexts, 4 needed"):
        s.unrelated_contexts(WORDS, 4)


def test_nq_layout(tmp_path):
    folder = tmp_path / "nq"
    folder.mkdir()
    toks = [{"token": t, "html_token": t.startswith("<")} for t in "<P> Emma lives in Highbury </P>".split()]
    rec = {"example_id": 7, "question_text": "where does emma live", "document_tokens": toks,
           "annotations": [{"yes_no_answer": "NONE", "long_answer": {"start_token": 0, "end_token": 6},
                            "short_answers": [{"start_token": 4, "end_token": 5}]}]}
    no_short = {**rec, "example_id": 8, "annotations": [{**rec["annotations"][0], "short_answers": []}]}
    (folder / authors.NQ_FILES[0]).write_text(json.dumps(rec) + "\n" + json.dumps(no_short) + "\n")
    train = {"document_text": "a b c d e f", "annotations": [{"yes_no_answer": "NONE", "long_answer": {"start_token": 1, "end_token": 4}}]}
    (folder / authors.NQ_FILES[1]).write_text((json.dumps(train) + "\n") * 3)
    s = authors.load(folder)
    assert [(r.id, r.context, r.question, r.answers) for r in s.records] == [
        ("7", "Context: Emma lives in Highbury", "Questions: where does emma live? Answer:", ["Highbury"])]
    assert s.unrelated_contexts(TextTokenizer("id", lambda t: [0] * len(t.split()), lambda ids: "x " * len(ids), 99), 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / authors.NQ_FILES[0]).write_text(json.dumps(rec) + "\n{not json\n")
    with pytest.raises(QAFormatError, match=r"v1.0-simplified_nq-dev-all.jsonl:2: not valid JSON"):
        authors.load(bad)


def test_authors_folder_gives_their_protocol(tmp_path):
    ds = load_retention_data(str(make_squad(tmp_path / "squad")), WORDS, max_distance=2)
    assert ds.preset == {"max_new_tokens": 10, "postprocess": "none", "chunk_tokens": 512}
    assert list(ds.distractors.texts(0, ds.records[0])) == list(ds.distractors.texts(1, ds.records[1]))
    with pytest.raises(FileNotFoundError, match="neither the authors' SQuAD"):
        authors.load(tmp_path)


# ---------------------------------------------------------------------- books
def test_planted_facts_are_reproducible_and_answerable_only_from_the_context():
    a, b = books.planted_facts(12, seed=3), books.planted_facts(12, seed=3)
    assert [r.to_json() for r in a] == [r.to_json() for r in b]
    assert [r.to_json() for r in a] != [r.to_json() for r in books.planted_facts(12, seed=4)]
    for r in a:
        assert r.answers[0].split()[-1] in r.context and r.answers[0] not in r.question
        assert books.book_of(r) in books.book_names()


def test_distractors_come_from_other_books():
    fact = books.planted_facts(1)[0]          # from emma
    texts = books.BookDistractors(seed=0).texts(0, fact)
    own = set(books.paragraphs(books.book_of(fact)))
    for _ in range(40):
        piece = next(texts)
        assert len(piece) >= 4000 and not any(p in piece for p in list(own)[:50])


def test_needle_at_depth():
    hay = [[1, 1], [2, 2, 2], [3], [4, 4]]
    assert books.insert_at_depth(hay, [9], 0.0) == ([9, 1, 1, 2, 2, 2, 3, 4, 4], 0)
    assert books.insert_at_depth(hay, [9], 1.0) == ([1, 1, 2, 2, 2, 3, 4, 4, 9], 8)
    ids, at = books.insert_at_depth(hay, [9], 0.5)
    assert ids[at] == 9 and at in (2, 5)
    with pytest.raises(ValueError, match="depth"):
        books.insert_at_depth(hay, [9], 1.5)


def test_haystack_has_the_length_asked():
    tok = TextTokenizer("chars", lambda t: [ord(c) % 500 for c in t], lambda ids: "", 512)
    hay = books.haystack_ids(tok, "persuasion", 3000, random.Random(0))
    assert sum(map(len, hay)) == 3000
