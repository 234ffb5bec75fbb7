"""Retrieval over local documents: chunks, BM25, dense embeddings and their fusion.

The long-context path of attribute abstraction (a patient's notes are longer than a small
model's context) and any retrieval-augmented prompt need the same three steps: cut the
documents into overlapping chunks, score the chunks against a query, keep the best few.

* `chunk_text` / `chunk_spans` cut a text into windows of at most `max_words` words that
  overlap by `overlap` words; a window ends at a sentence end when one falls in its second
  half (cheap sentence awareness: no sentence splitter, only `.`, `!`, `?`, `;` and blank
  lines). `chunk_spans` keeps each chunk's character offsets, so a hit points back into its
  note; `chunk_documents` does it for many documents and names chunks `"<doc_id>#<i>"`.
* `BM25Index` is lexical search with `bm25s` (Lucene's BM25: idf = log(1 + (N - df + 0.5) /
  (df + 0.5)), term weight idf * tf / (tf + k1 * (1 - b + b * |d| / avgdl))). Tokens are
  lowercased word characters (`\\w+`, so "T2", "ECOG 1" keep their digits), the 33
  English stopwords of Lucene's classic list removed ("no" and "not" among them: negation
  matters to extraction, not to finding the passage), no stemming (clinical abbreviations
  stem badly).
* `DenseIndex` embeds chunks and queries through `client.embed(texts)` (any `LLMClient`: the
  local model, `mlx-med serve`'s /v1/embeddings or another endpoint) and ranks by cosine.
* `HybridIndex` fuses any indexes by reciprocal rank fusion (Cormack, Clarke & Buettcher,
  SIGIR 2009): score(d) = sum over indexes i of 1 / (k_rrf + rank_i(d)), ranks starting at 1,
  a document absent from an index's candidate list contributing nothing; k_rrf = 60 as in
  the paper. Ranks rather than scores are fused, so BM25 and cosine need no calibration.

Edge cases, decided once for all indexes: an empty corpus is a ValueError (an index of
nothing is a bug upstream); an empty query, or one whose words are all stopwords or unknown
to the corpus, returns no hits. BM25 returns only documents sharing a term with the query
(score > 0); dense search returns the k nearest whatever their score.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Words are maximal runs of non-space characters; a chunk is a run of whole words.
_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?;]['\")\]]*$")  # not ':' ("Diagnosis: ..." stays whole)
_TOKEN_PATTERN = r"(?u)\b\w+\b"
DOCUMENT_SUFFIXES = (".txt", ".md")


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A window of a document: its text and where it sits in the document (character offsets)."""

  text: str
  start: int         # text == document[start:end]
  end: int
  doc_id: str = ""
  index: int = 0     # position among the document's chunks

  @property
  def id(self) -> str:
    return f"{self.doc_id}#{self.index}"


def _check_window(max_words: int, overlap: int) -> None:
  if max_words < 1:
    raise ValueError(f"max_words must be >= 1, got {max_words}")
  if overlap < 0 or overlap >= max_words:
    raise ValueError(f"overlap must be in [0, max_words), got overlap={overlap} with max_words={max_words}")


def chunk_spans(text: str, *, max_words: int = 120, overlap: int = 20, doc_id: str = "") -> list[Chunk]:
  """Overlapping windows of whole words with their character offsets (see the module docstring).

  Each window has at most `max_words` words; it is cut after the last sentence end in its
  second half when there is one (so fewer words), else after `max_words` words. The next
  window starts `overlap` words before the previous one ended (always moving forward).
  A text without words gives no chunks.
  """
  _check_window(max_words, overlap)
  words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
  # A word ends a sentence if it ends with punctuation or a blank line follows it.
  ends = [bool(_SENTENCE_END.search(text[s:e])) or "\n\n" in text[e:words[j + 1][0] if j + 1 < len(words) else e]
          for j, (s, e) in enumerate(words)]
  chunks: list[Chunk] = []
  i, n = 0, len(words)
  while i < n:
    end = min(i + max_words, n)
    if end < n:
      for j in range(end - 1, i + max_words // 2 - 1, -1):
        if ends[j] and j + 1 - i > overlap:
          end = j + 1
          break
    start_char, end_char = words[i][0], words[end - 1][1]
    chunks.append(Chunk(text[start_char:end_char], start_char, end_char, doc_id, len(chunks)))
    if end == n:
      break
    i = max(end - overlap, i + 1)
  return chunks


def chunk_text(text: str, *, max_words: int = 120, overlap: int = 20) -> list[str]:
  """The texts of `chunk_spans(text, ...)`."""
  return [c.text for c in chunk_spans(text, max_words=max_words, overlap=overlap)]


def chunk_documents(docs: Mapping[str, str], *, max_words: int = 120, overlap: int = 20) -> list[Chunk]:
  """Chunks of every document, in the mapping's order; chunk ids are `"<doc_id>#<i>"`."""
  out: list[Chunk] = []
  for doc_id, text in docs.items():
    out.extend(chunk_spans(text, max_words=max_words, overlap=overlap, doc_id=str(doc_id)))
  return out


def load_documents(directory: str | os.PathLike, *, suffixes: Sequence[str] = DOCUMENT_SUFFIXES) -> dict[str, str]:
  """The .txt / .md files under `directory` (recursively, sorted), keyed by their relative path."""
  root = Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"document folder {root} does not exist (or is not a folder)")
  docs: dict[str, str] = {}
  for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
    try:
      docs[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
  if not docs:
    raise ValueError(f"no {'/'.join(suffixes)} files under {root}")
  return docs


@dataclasses.dataclass
class Hit:
  """One search result. rank starts at 1; start/end locate a chunk in its source document
  when the index was built `from_chunks` (else None)."""

  doc_id: str
  score: float
  text: str
  rank: int
  source: str | None = None
  start: int | None = None
  end: int | None = None


class _Index:
  """Shared bookkeeping: texts, ids, optional chunk spans, hit construction."""

  texts: list[str]
  ids: list[str]
  _spans: list[Chunk] | None = None

  def _set_corpus(self, texts: Sequence[str], ids: Sequence[Any] | None) -> None:
    texts = list(texts)
    if not texts:
      raise ValueError(f"{type(self).__name__} needs at least one document (the corpus is empty)")
    if not all(isinstance(t, str) for t in texts):
      raise TypeError(f"{type(self).__name__}: every document must be a str")
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    if len(ids) != len(texts):
      raise ValueError(f"{type(self).__name__}: {len(ids)} ids for {len(texts)} documents")
    if len(set(ids)) != len(ids):
      dup = next(i for i in ids if ids.count(i) > 1)
      raise ValueError(f"{type(self).__name__}: document id {dup!r} is used twice; ids must be unique")
    self.texts, self.ids = texts, ids

  @classmethod
  def from_chunks(cls, chunks: Sequence[Chunk], *args, **kwargs):
    """An index over `chunks` (from `chunk_documents`): hits carry the chunk id, the source
    document and the character span."""
    chunks = list(chunks)
    index = cls(*args, [c.text for c in chunks], [c.id for c in chunks], **kwargs)
    index._spans = chunks
    return index

  def __len__(self) -> int:
    return len(self.texts)

  def _hits(self, order: Sequence[int], scores: Sequence[float]) -> list[Hit]:
    hits = []
    for rank, (i, s) in enumerate(zip(order, scores), start=1):
      span = self._spans[i] if self._spans is not None else None
      hits.append(Hit(self.ids[i], float(s), self.texts[i], rank,
                      source=span.doc_id if span else None, start=span.start if span else None,
                      end=span.end if span else None))
    return hits


def _check_k(k: int) -> None:
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")


def tokenize(texts: Sequence[str]) -> list[list[str]]:
  """The BM25 tokens of each text: lowercased `\\w+` runs without Lucene's English stopwords, unstemmed."""
  import bm25s

  return bm25s.tokenize(list(texts), lower=True, token_pattern=_TOKEN_PATTERN, stopwords="en", stemmer=None,
                        return_ids=False, show_progress=False)


class BM25Index(_Index):
  """Lucene BM25 over a list of texts (bm25s, float64 scores). See the module docstring."""

  def __init__(self, texts: Sequence[str], ids: Sequence[Any] | None = None, *, k1: float = 1.5,
               b: float = 0.75):
    import bm25s

    if k1 < 0 or not 0 <= b <= 1:
      raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
    self._set_corpus(texts, ids)
    tokens = tokenize(self.texts)
    if not any(tokens):
      raise ValueError("BM25Index: no document has an indexable word (all empty or stopwords)")
    self.k1, self.b = k1, b
    self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
    self._bm25.index(tokens, show_progress=False)

  def scores(self, query: str) -> np.ndarray:
    """The BM25 score of every document for `query` (zeros when no query word is indexed)."""
    ids = self._bm25.get_tokens_ids(tokenize([query])[0])
    if not ids:
      return np.zeros(len(self.texts))
    return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float64)

  def search(self, query: str, k: int = 5) -> list[Hit]:
    _check_k(k)
    scores = self.scores(query)
    order = [i for i in np.argsort(-scores, kind="stable")[:k] if scores[i] > 0]
    return self._hits(order, scores[order])


class DenseIndex(_Index):
  """Cosine similarity of `client.embed` vectors (rows re-normalised here, whatever the client returns)."""

  def __init__(self, client: Any, texts: Sequence[str], ids: Sequence[Any] | None = None, *,
               batch_size: int = 32):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._set_corpus(texts, ids)
    self.client, self.batch_size = client, batch_size
    self.vectors = np.concatenate([self._embed(self.texts[i:i + batch_size])
                                   for i in range(0, len(self.texts), batch_size)])

  def _embed(self, texts: list[str]) -> np.ndarray:
    vecs = np.asarray(self.client.embed(texts), dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[0] != len(texts):
      raise ValueError(f"client.embed returned shape {vecs.shape} for {len(texts)} texts; expected [N, D]")
    if not np.all(np.isfinite(vecs)):
      raise ValueError("client.embed returned non-finite values")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)

  def scores(self, query: str) -> np.ndarray:
    q = self._embed([query])
    if q.shape[1] != self.vectors.shape[1]:
      raise ValueError(f"query embedding has {q.shape[1]} dims, the index {self.vectors.shape[1]}: "
                       "the client's model changed since the index was built")
    return self.vectors @ q[0]

  def search(self, query: str, k: int = 5) -> list[Hit]:
    _check_k(k)
    if not query.strip():
      return []
    scores = self.scores(query)
    order = list(np.argsort(-scores, kind="stable")[:k])
    return self._hits(order, scores[order])


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], *, k_rrf: float = 60,
                           weights: Sequence[float] | None = None) -> list[tuple[str, float]]:
  """Fuses ranked lists of ids: score(d) = sum_i w_i / (k_rrf + rank_i(d)), rank from 1.

  Returns (id, score) best first; ties keep the order in which ids were first seen
  (earlier lists first). `weights` default to 1 for every list.
  """
  if k_rrf < 0:
    raise ValueError(f"k_rrf must be >= 0, got {k_rrf}")
  weights = [1.0] * len(rankings) if weights is None else list(weights)
  if len(weights) != len(rankings):
    raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
  fused: dict[str, float] = {}
  for ranking, w in zip(rankings, weights):
    if len(set(ranking)) != len(ranking):
      raise ValueError("a ranking lists the same id twice")
    for rank, doc_id in enumerate(ranking, start=1):
      fused[doc_id] = fused.get(doc_id, 0.0) + w / (k_rrf + rank)
  return sorted(fused.items(), key=lambda kv: -kv[1])  # sorted() is stable: ties keep first-seen order


class HybridIndex:
  """Reciprocal rank fusion of indexes over the same documents (ids must agree across them).

  Each index contributes its top `depth` hits (default max(4k, 50)); see
  `reciprocal_rank_fusion` for the formula. Hit.score is the fused score.
  """

  def __init__(self, *indexes: Any, k_rrf: float = 60, weights: Sequence[float] | None = None,
               depth: int | None = None):
    if not indexes:
      raise ValueError("HybridIndex needs at least one index")
    if weights is not None and len(weights) != len(indexes):
      raise ValueError(f"{len(weights)} weights for {len(indexes)} indexes")
    if k_rrf < 0:
      raise ValueError(f"k_rrf must be >= 0, got {k_rrf}")
    self.indexes, self.k_rrf, self.weights, self.depth = list(indexes), k_rrf, weights, depth

  def search(self, query: str, k: int = 5) -> list[Hit]:
    _check_k(k)
    depth = self.depth or max(4 * k, 50)
    results = [index.search(query, k=depth) for index in self.indexes]
    by_id: dict[str, Hit] = {}
    for hits in results:
      for h in hits:
        by_id.setdefault(h.doc_id, h)
    fused = reciprocal_rank_fusion([[h.doc_id for h in hits] for hits in results], k_rrf=self.k_rrf,
                                   weights=self.weights)
    return [dataclasses.replace(by_id[doc_id], score=score, rank=rank)
            for rank, (doc_id, score) in enumerate(fused[:k], start=1)]
