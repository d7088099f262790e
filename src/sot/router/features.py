"""The trained router's word features: tokens, unigrams and bigrams, and their TF-IDF vector, in pure Python.

Chosen by cross-validation on LIMA (see `sot router train`): word unigrams and bigrams (with a
start-of-text marker, digits folded to "0"), sublinear TF, smoothed IDF, L2 norm: scikit-learn's
`TfidfVectorizer(analyzer=terms, sublinear_tf=True)` computes the same numbers, which training checks.
Character n-grams added no measurable accuracy at five times the size.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping

TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
START = "<s>"

FEATURES_DESCRIPTION = {
    "tokens": TOKEN.pattern,
    "numbers": "0",
    "ngrams": [1, 2],
    "start_marker": START,
    "tf": "1 + ln(count)",
    "idf": "ln((1 + n) / (1 + df)) + 1",
    "norm": "l2",
}


def tokens(text: str) -> list[str]:
    """Lower-cased word, number and symbol tokens; every number becomes "0".

    >>> tokens("What's 2+2, MIPS?")
    ['what', "'", 's', '0', '+', '0', ',', 'mips', '?']
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return ["0" if t[0] in "0123456789" else t for t in TOKEN.findall(text)]


def terms(text: str) -> list[str]:
    """The features of one text, with repeats: unigrams, then bigrams (a start marker first).

    A unigram never contains a space and a bigram always does, so the two share one vocabulary.

    >>> terms("How to cook?")
    ['how', 'to', 'cook', '?', '<s> how', 'how to', 'to cook', 'cook ?']
    """
    toks = tokens(text)
    out = list(toks)
    prev = START
    for tok in toks:
        out.append(prev + " " + tok)
        prev = tok
    return out


def tfidf_vector(text: str, idf: Mapping[str, float]) -> dict[str, float]:
    """The L2-normalised TF-IDF vector of `text` over the vocabulary `idf` (scikit-learn's formula:
    tf = 1 + ln(count), idf = ln((1 + n) / (1 + df)) + 1).

    >>> {t: round(x, 4) for t, x in tfidf_vector("a a b", {"a": 1.0, "b": 2.0}).items()}
    {'a': 0.6461, 'b': 0.7632}
    """
    counts = Counter(t for t in terms(text) if t in idf)
    weights = {t: (1.0 + math.log(c)) * idf[t] for t, c in counts.items()}
    norm = math.sqrt(sum(w * w for w in weights.values()))
    return {t: w / norm for t, w in weights.items()} if norm else {}


def display(term: str) -> str:
    """A term as a reason shows it: a bigram at the start of the text reads "^word"."""
    return term.replace(START + " ", "^")
