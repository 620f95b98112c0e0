"""Okapi BM25 ranking over a small local corpus, and the corpus loader.

BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and
Beyond", eq. 3.15) scores a document D for a query Q as

    sum over query terms q of  idf(q) * f(q, D) * (k1 + 1) / (f(q, D) + k1 * (1 - b + b * |D| / avgdl))

where f(q, D) is the count of q in D, |D| the document's length in tokens and avgdl
the mean length. The idf is the variant Lucene and ``rank_bm25``'s ``BM25Okapi`` use
in practice, ``log((N - n + 0.5) / (n + 0.5) + 1)`` with N documents of which n
contain q: the ``+ 1`` keeps it positive for terms in more than half the documents,
where the textbook form turns negative and would rank a document lower for
matching. A query term given twice counts twice, as in ``rank_bm25``.

Scoring walks an inverted index (term -> [(document, count)]), so a query costs time
in the number of postings of its terms, not in the size of the corpus.

Users: the retrieval tool (``llmkit.infer.tools.retrieval_tool``) and demonstration
selection for in-context learning (``llmkit.infer.prompting``).
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from pathlib import Path

from llmkit.config import check
from llmkit.errors import InputError
from llmkit.io import iter_jsonl

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters, digits and underscores (Unicode-aware)."""
    return _WORD.findall(text.lower())


class BM25:
    """A BM25 index over ``documents``; ``k1`` saturates term counts, ``b`` sets length normalisation."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        check(k1 >= 0, "k1", k1, "must be >= 0")
        check(0 <= b <= 1, "b", b, "must be in [0, 1]")
        if not documents:
            raise InputError("BM25 needs at least one document; the corpus is empty")
        self.documents = list(documents)
        self.k1, self.b = k1, b
        counts = [Counter(tokenize(document)) for document in self.documents]
        self.lengths = [sum(count.values()) for count in counts]
        # An all-empty corpus has avgdl 0; every length ratio is then 0/0, and any positive value gives the same (zero)
        # scores.
        self.average_length = sum(self.lengths) / len(self.lengths) or 1.0
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for index, count in enumerate(counts):
            for term, frequency in count.items():
                self.postings.setdefault(term, []).append((index, frequency))
        total = len(self.documents)
        self.idf = {
            term: math.log((total - len(posting) + 0.5) / (len(posting) + 0.5) + 1)
            for term, posting in self.postings.items()
        }

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every document for ``query``, in corpus order."""
        scores = [0.0] * len(self.documents)
        for term in tokenize(query):
            for index, frequency in self.postings.get(term, ()):
                length_norm = 1 - self.b + self.b * self.lengths[index] / self.average_length
                scores[index] += self.idf[term] * frequency * (self.k1 + 1) / (frequency + self.k1 * length_norm)
        return scores

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best documents, best first; equal scores keep corpus order."""
        check(k >= 0, "k", k, "must be >= 0")
        scores = self.scores(query)
        # A partial sort, O(N log k): a full sort would cost O(N log N) on every query of a large corpus.
        return heapq.nsmallest(k, range(len(scores)), key=lambda index: (-scores[index], index))


def _paragraphs(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error})") from None
    return [paragraph.strip() for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for line_number, record in iter_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise InputError(f"{path}:{line_number}: expected a string field 'text', got {type(text).__name__}")
        if text.strip():
            texts.append(text.strip())
    return texts


_READERS = {".txt": _paragraphs, ".jsonl": _jsonl_texts}


def load_corpus(path: str | Path) -> list[str]:
    """Passages from a ``.txt`` file (paragraphs split at blank lines), a ``.jsonl`` file (its
    ``text`` fields), or a directory (every such file below it, in sorted path order)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix in _READERS)
        if not files:
            raise InputError(f"{path}: no .txt or .jsonl files in this corpus directory")
    elif path.is_file():
        if path.suffix not in _READERS:
            raise InputError(f"{path}: a corpus file must end in .txt or .jsonl, not '{path.suffix}'")
        files = [path]
    else:
        raise InputError(f"{path}: corpus not found")
    passages = [passage for file in files for passage in _READERS[file.suffix](file)]
    if not passages:
        raise InputError(f"{path}: the corpus has no text")
    return passages
