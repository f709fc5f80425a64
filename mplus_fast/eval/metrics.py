"""Answer metrics, written once: SQuAD/LongBench normalisation, exact match, QA-F1, ROUGE-L,
LongBench's classification / retrieval / count / code-similarity scores, needle string match,
and the answer post-processing applied before scoring.

Every score is in [0, 1] for one prediction against one reference; `best` takes the maximum over
a list of accepted references (SQuAD and LongBench both score that way). The definitions follow
the public scripts the numbers are compared with:
- `normalize_answer`, `exact_match`, `qa_f1`: the SQuAD v1.1 evaluation script (also LongBench's
  `qa_f1_score`): lower case, punctuation removed, articles a/an/the removed, whitespace collapsed;
  F1 over the bag of remaining words.
- `rouge_l`: LongBench's `rouge_score`, i.e. the `rouge` package's summary-level ROUGE-L F:
  sentences split on '.', words split on single spaces, the union of the longest common
  subsequences counted over *distinct* words (that package's default), F = 2PR / (P + R + 1e-8);
  empty text scores 0. Written iteratively, so long texts do not hit Python's recursion limit
  (the package raises there and LongBench then scores 0).
- `classification_score`, `retrieval_score`, `count_score`, `code_sim_score`: LongBench's metrics
  of the same names (`code_sim_score` with the Indel ratio that `fuzzywuzzy`/`rapidfuzz` compute).
- `hit`: the authors' retention metric ("exact hit": the reference, stripped, is a substring of
  the prediction) and the needle-in-a-haystack string match.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Iterable

from mplus_fast.eval.errors import MissingExtra

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


# ---------------------------------------------------------------------- normalisation
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """LongBench's Chinese normalisation: lower case, no (CJK or ASCII) punctuation, no spaces."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


# ---------------------------------------------------------------------- QA metrics
def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    """F1 over two bags of tokens (0 when nothing is shared)."""
    same = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    cut = _jieba_cut()
    pred = [t for t in (normalize_zh_answer(w) for w in cut(prediction)) if t]
    ref = [t for t in (normalize_zh_answer(w) for w in cut(reference)) if t]
    return token_f1(pred, ref)


def hit(prediction: str, reference: str) -> float:
    """1 when the stripped reference occurs in the prediction (case-sensitive, as the authors)."""
    return float(reference.strip() in prediction)


# ---------------------------------------------------------------------- ROUGE-L
def _sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one longest common subsequence of x and y, reconstructed from the end with
    the `rouge` package's tie rule (on a tie, step back in y)."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    words, i, j = set(), n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F as LongBench computes it (see the module doc)."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    split = lambda sents: [w for s in sents for w in s.split(" ")]
    m, n = len(set(split(ref))), len(set(split(hyp)))
    union: set[str] = set()
    for r in ref:
        rw = r.split(" ")
        for h in hyp:
            union |= _lcs_words(rw, h.split(" "))
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_l_zh(prediction: str, reference: str) -> float:
    cut = _jieba_cut()
    return rouge_l(" ".join(cut(prediction)), " ".join(cut(reference)))


# ---------------------------------------------------------------------- LongBench's other scores
def classification_score(prediction: str, reference: str, all_classes: list[str]) -> float:
    """LongBench: the classes named in the prediction, minus those that are only a part of the
    reference; 1/k when the reference is among the k left, else 0. LongBench removes from the
    list while iterating over it, which skips the class after each removal: kept, so that the
    scores agree."""
    named = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(named):
        if named[i] in reference and named[i] != reference:
            del named[i]
        i += 1
    return 1.0 / len(named) if reference in named else 0.0


def _numbers_score(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str) -> float:
    """LongBench passage_count: the share of the numbers in the prediction that equal the count."""
    return _numbers_score(prediction, str(reference))


def retrieval_score(prediction: str, reference: str) -> float:
    """LongBench passage_retrieval_en: reference "Paragraph k"; share of the numbers that are k."""
    found = re.findall(r"Paragraph (\d+)", reference)
    return _numbers_score(prediction, found[0]) if found else 0.0


def retrieval_zh_score(prediction: str, reference: str) -> float:
    found = re.findall(r"段落(\d+)", reference)
    return _numbers_score(prediction, found[0]) if found else 0.0


def indel_ratio(a: str, b: str) -> float:
    """fuzzywuzzy/rapidfuzz `fuzz.ratio` / 100: 2·LCS(a, b) / (|a| + |b|), rounded to a percent."""
    if not a and not b:
        return 1.0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return round(100 * 2 * prev[-1] / (len(a) + len(b))) / 100


def code_sim_score(prediction: str, reference: str) -> float:
    """LongBench lcc / repobench-p: the first line that is not a comment or a code fence,
    compared with the reference line by Indel ratio."""
    line = next((l for l in prediction.lstrip("\n").split("\n") if "`" not in l and "#" not in l and "//" not in l), "")
    return indel_ratio(line, reference)


# ---------------------------------------------------------------------- post-processing
def first_line(text: str) -> str:
    """The first line after leading newlines (LongBench's rule for trec/triviaqa/samsum/lsht)."""
    return text.lstrip("\n").split("\n")[0]


# Not a sentence end: the full stop of a title before a name (one home for the rule: books.py too).
NOT_AFTER_TITLE = r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)"
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])" + NOT_AFTER_TITLE + r"\s")


def first_sentence(text: str) -> str:
    """The first line, cut after its first sentence end (. ! ? followed by a space)."""
    return _SENTENCE_END.split(first_line(text).strip(), maxsplit=1)[0]


POSTPROCESS: dict[str, Callable[[str], str]] = {
    "none": lambda s: s,
    "first-line": first_line,
    "first-sentence": first_sentence,
}


def postprocess(text: str, how: str) -> str:
    if how not in POSTPROCESS:
        raise ValueError(f"unknown answer post-processing {how!r}: choose from {list(POSTPROCESS)}")
    return POSTPROCESS[how](text)


# ---------------------------------------------------------------------- helpers
METRICS: dict[str, Callable[[str, str], float]] = {
    "em": exact_match, "f1": qa_f1, "hit": hit, "rouge_l": rouge_l,
}


def best(metric: Callable[..., float], prediction: str, references: Iterable[str], **kw) -> float:
    """The best score over the accepted references (0 with none)."""
    return max((metric(prediction, r, **kw) for r in references), default=0.0)


def qa_scores(prediction: str, references: list[str]) -> dict[str, float]:
    """EM, QA-F1 and hit of one answer against its accepted references."""
    return {name: best(METRICS[name], prediction, references) for name in ("em", "f1", "hit")}


def _jieba_cut():
    try:
        import jieba
    except ImportError:
        raise MissingExtra("the Chinese LongBench metrics need the `jieba` package: pip install jieba") from None
    return lambda text: list(jieba.cut(text, cut_all=False))
