"""Our metrics against lm_eval's implementations (its LongBench metrics module, its SQuAD-style
F1) on hand-picked and generated strings, plus the cases each definition turns on."""
from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings, strategies as st

from mplus_fast.eval import metrics as M

PAIRS = [
    ("The Eiffel Tower", "eiffel tower"), ("in the old desk.", "in the desk"), ("Paris, France", "paris"),
    ("", "anything"), ("a an the", "the"), ("Mr. Darcy's letter", "Darcy letter"), ("42", "forty two"),
    ("the cat sat on the mat. It was red. the cat", "the cat was on the mat. a red cat"),
    ("Nothing in common", "at all"), ("yes yes yes", "yes"),
]
WORDS = st.lists(st.sampled_from("the cat a sat on mat red . , it was Paris an dog !".split(" ")), max_size=25).map(" ".join)


@pytest.fixture(scope="module")
def lb():
    pytest.importorskip("lm_eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from lm_eval.tasks.longbench import metrics as lb
        except ImportError as exc:
            pytest.skip(f"lm_eval's LongBench metrics need jieba, fuzzywuzzy, rouge: {exc}")
    return lb


@pytest.mark.parametrize("pred, ref", PAIRS)
def test_normalisation_f1_rouge_match_lm_eval(lb, pred, ref):
    assert M.normalize_answer(pred) == lb.normalize_answer(pred)
    assert M.qa_f1(pred, ref) == pytest.approx(lb.qa_f1_score(pred, ref))
    assert M.rouge_l(pred, ref) == pytest.approx(lb.rouge_score(pred, ref))


@settings(max_examples=150, deadline=None)
@given(WORDS, WORDS)
def test_generated_strings_match_lm_eval(lb, pred, ref):
    assert M.qa_f1(pred, ref) == pytest.approx(lb.qa_f1_score(pred, ref))
    assert M.rouge_l(pred, ref) == pytest.approx(lb.rouge_score(pred, ref))
    assert M.count_score(pred + " 3 7", "3") == pytest.approx(lb.count_score(pred + " 3 7", "3"))


@pytest.mark.parametrize("pred", ["Paragraph 3", "It is paragraph 3 or 12", "none", "Paragraph 30 and 3"])
def test_retrieval_and_count_match_lm_eval(lb, pred):
    assert M.retrieval_score(pred, "Paragraph 3") == lb.retrieval_score(pred, "Paragraph 3")
    assert M.count_score(pred, "3") == lb.count_score(pred, "3")


@pytest.mark.parametrize("pred", ["Location", "Entity and Location", "Abbreviation Entity Location Loc", "nothing"])
def test_classification_matches_lm_eval(lb, pred):
    classes = ["Abbreviation", "Entity", "Location", "Loc", "Description"]
    for ref in ("Location", "Loc", "Entity"):
        assert M.classification_score(pred, ref, classes) == lb.classification_score(pred, ref, all_classes=classes)


@pytest.mark.parametrize("pred, ref", [("x = foo(1)\n", "x = foo(2)"), ("# comment\nreturn a + b", "return a+b"),
                                       ("```\nprint(x)", "print(y)"), ("", "a")])
def test_code_similarity_matches_lm_eval(lb, pred, ref):
    pytest.importorskip("Levenshtein")   # fuzzywuzzy computes the Indel ratio only with it
    assert M.code_sim_score(pred, ref) == pytest.approx(lb.code_sim_score(pred, ref))


def test_chinese_metrics_match_lm_eval(lb):
    pytest.importorskip("jieba")
    for pred, ref in [("我爱北京天安门", "北京天安门"), ("今天天气很好。", "天气好")]:
        assert M.qa_f1_zh(pred, ref) == pytest.approx(lb.qa_f1_zh_score(pred, ref))
        assert M.rouge_l_zh(pred, ref) == pytest.approx(lb.rouge_zh_score(pred, ref))


def test_squad_f1_and_em_match_lm_eval_squad_v11_f1():
    squad = pytest.importorskip("lm_eval.tasks.qasper.metrics")   # "the official evaluation script for v1.1 of SQuAD"
    for pred, ref in PAIRS:
        assert M.qa_f1(pred, ref) == pytest.approx(squad.f1_abstractive([pred], [ref]))
        assert M.exact_match(pred, ref) == float(squad.normalize_answer(pred) == squad.normalize_answer(ref))


def test_long_texts_do_not_hit_the_recursion_limit():
    text = " ".join(f"w{i}" for i in range(3000))
    assert M.rouge_l(text, text) == pytest.approx(1.0)


@pytest.mark.parametrize("how, text, want", [("first-line", "\n\nParis\nand more", "Paris"),
                                              ("first-sentence", " Paris is it. And more.", "Paris is it."),
                                              ("first-sentence", "Mr. Darcy", "Mr. Darcy"),
                                              ("none", "a\nb", "a\nb")])
def test_postprocessing(how, text, want):
    assert M.postprocess(text, how) == want


def test_hit_is_the_authors_substring_rule():
    assert M.hit("The answer is Paris, France", " Paris ") == 1.0 and M.hit("paris", "Paris") == 0.0
    assert M.qa_scores("in the desk", ["in the box", "In the desk!"]) == {"em": 1.0, "f1": 1.0, "hit": 0.0}


def test_unknown_postprocessing_is_named():
    with pytest.raises(ValueError, match="first-word"):
        M.postprocess("x", "first-word")
