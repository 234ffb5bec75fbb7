"""Retrieval: chunking with offsets, BM25 against a hand-written Lucene BM25, dense search through a
fake embedding client, reciprocal rank fusion on hand-made ranks, loading a folder of notes."""

from __future__ import annotations

import itertools
import math
import zlib
from collections import Counter

import numpy as np
import pytest

from mlx_med.apps.retrieval import (
  BM25Index,
  Chunk,
  DenseIndex,
  Hit,
  HybridIndex,
  chunk_documents,
  chunk_spans,
  chunk_text,
  load_documents,
  reciprocal_rank_fusion,
)

NOTES = {
  "path_2021-03-02": "Surgical pathology report. Specimen: right upper lobe wedge resection. Diagnosis: invasive "
                     "adenocarcinoma, acinar predominant, 2.8 cm. Margins negative. Visceral pleural invasion not "
                     "identified. Histologic grade 2.",
  "rad_2021-02-10": "CT chest with contrast. A 2.9 cm spiculated nodule in the right upper lobe. No mediastinal "
                    "lymphadenopathy. No pleural effusion. Impression: suspicious for primary lung malignancy.",
  "clinic_2021-04-01": "Oncology clinic visit. The patient is fully active, ECOG performance status 0. Plan adjuvant "
                       "chemotherapy with cisplatin and pemetrexed for four cycles.",
  "cardio_2020-11-20": "Cardiology follow up. Atrial fibrillation, rate controlled on metoprolol. Echocardiogram shows "
                       "preserved ejection fraction. Continue apixaban.",
  "derm_2019-06-05": "Dermatology. Seborrheic keratosis on the back, benign appearance. No treatment needed.",
}


# ---------------------------------------------------------------- chunking

def test_chunks_are_slices_of_the_text_with_bounded_size_and_overlap():
  words = [f"w{i}" for i in range(53)]
  text = "  ".join(words[:10]) + "\n" + " ".join(words[10:])
  chunks = chunk_spans(text, max_words=12, overlap=3, doc_id="note")
  assert [c.index for c in chunks] == list(range(len(chunks)))
  covered = []
  for c in chunks:
    assert text[c.start:c.end] == c.text
    assert c.doc_id == "note" and c.id == f"note#{c.index}"
    assert len(c.text.split()) == 12 or c is chunks[-1]
    covered.append(c.text.split())
  # Consecutive windows share exactly `overlap` words (no sentence ends here); together they cover every word once
  # apart from the overlaps.
  for a, b in itertools.pairwise(covered):
    assert a[-3:] == b[:3]
  flat = covered[0] + [w for ws in covered[1:] for w in ws[3:]]
  assert flat == words
  assert chunk_text(text, max_words=12, overlap=3) == [c.text for c in chunks]


def test_chunks_prefer_to_end_at_a_sentence_in_their_second_half():
  text = ("one two three four five six seven. eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen twenty")
  first = chunk_spans(text, max_words=10, overlap=2)[0]
  assert first.text == "one two three four five six seven."
  # A sentence end in the first half does not shorten the window.
  early = "one two. three four five six seven eight nine ten eleven twelve"
  assert chunk_text(early, max_words=10, overlap=2)[0].split()[-1] == "ten"
  # A blank line counts as a sentence end.
  para = "alpha beta gamma delta epsilon zeta\n\neta theta iota kappa lambda mu"
  assert chunk_text(para, max_words=10, overlap=2)[0] == "alpha beta gamma delta epsilon zeta"
  # A closing quote or bracket after the stop still ends the sentence; a colon does not.
  quoted = 'one two three four five six (seven.) eight nine ten eleven twelve'
  assert chunk_text(quoted, max_words=10, overlap=2)[0].endswith("(seven.)")
  label = "one two three four five six Diagnosis: invasive adenocarcinoma grade two"
  assert chunk_text(label, max_words=10, overlap=2)[0].endswith("adenocarcinoma grade")


def test_chunking_edge_cases_and_bad_windows():
  assert chunk_spans("") == [] and chunk_spans("  \n ") == []
  assert chunk_text("short note", max_words=5, overlap=0) == ["short note"]
  with pytest.raises(ValueError, match="overlap"):
    chunk_text("a b c", max_words=4, overlap=4)
  with pytest.raises(ValueError, match="max_words"):
    chunk_text("a b c", max_words=0, overlap=0)


# ---------------------------------------------------------------- BM25

def lucene_bm25(docs: list[list[str]], query: list[str], k1: float, b: float) -> list[float]:
  """Lucene's BM25, written out: idf = log(1 + (N - df + 0.5) / (df + 0.5)),
  weight = idf * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), summed over the query terms."""
  n = len(docs)
  avgdl = sum(len(d) for d in docs) / n
  out = []
  for d in docs:
    tf = Counter(d)
    s = 0.0
    for term in query:
      df = sum(term in other for other in docs)
      if df == 0:
        continue
      idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
      s += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(d) / avgdl))
    out.append(s)
  return out


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (1.2, 0.3), (0.9, 1.0)])
def test_bm25_scores_equal_a_hand_written_lucene_bm25(k1, b):
  # Lowercase words, no stopwords, no punctuation: the tokenisation is unambiguous.
  docs = ["tumor biopsy tumor margin negative",
          "chest ct nodule",
          "tumor board review chemotherapy plan chemotherapy cycles",
          "biopsy pathology adenocarcinoma tumor tumor tumor grade"]
  index = BM25Index(docs, ids=["a", "b", "c", "d"], k1=k1, b=b)
  for query in ["tumor biopsy", "chemotherapy", "tumor tumor nodule", "adenocarcinoma grade margin unknownword"]:
    expected = lucene_bm25([d.split() for d in docs], query.split(), k1, b)
    np.testing.assert_allclose(index.scores(query), expected, rtol=0, atol=1e-6)
    hits = index.search(query, k=4)
    positive = sorted((i for i, s in enumerate(expected) if s > 0), key=lambda i: -expected[i])
    assert [h.doc_id for h in hits] == [["a", "b", "c", "d"][i] for i in positive]
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    np.testing.assert_allclose([h.score for h in hits], [expected[i] for i in positive], atol=1e-6)


def test_bm25_tokens_are_lowercased_unstemmed_without_stopwords():
  index = BM25Index(["ECOG 1 today", "The tumor is T2", "Tumors were seen"])
  assert index.search("t2")[0].doc_id == "1"
  assert index.search("ecog 1")[0].doc_id == "0"      # digits and case-insensitive words are terms
  assert [h.doc_id for h in index.search("tumor")] == ["1"]  # no stemming: "Tumors" is another term
  assert index.search("the is was") == []             # only stopwords
  assert index.search("") == [] and index.search("zzz") == []


def test_bm25_finds_the_right_note_in_a_small_medical_corpus():
  index = BM25Index(list(NOTES.values()), ids=list(NOTES))
  assert index.search("histology of the resected adenocarcinoma", k=1)[0].doc_id == "path_2021-03-02"
  assert index.search("ECOG performance status", k=1)[0].doc_id == "clinic_2021-04-01"
  assert index.search("spiculated nodule on CT", k=1)[0].doc_id == "rad_2021-02-10"
  assert index.search("anticoagulation apixaban atrial fibrillation", k=1)[0].doc_id == "cardio_2020-11-20"
  top = index.search("right upper lobe", k=5)
  assert {h.doc_id for h in top[:2]} == {"path_2021-03-02", "rad_2021-02-10"}
  assert all(isinstance(h, Hit) and h.source is None for h in top)


def test_bm25_over_chunks_points_back_into_the_notes():
  chunks = chunk_documents(NOTES, max_words=12, overlap=3)
  assert all(isinstance(c, Chunk) for c in chunks)
  index = BM25Index.from_chunks(chunks)
  hit = index.search("pemetrexed cisplatin", k=1)[0]
  assert hit.source == "clinic_2021-04-01" and hit.doc_id.startswith("clinic_2021-04-01#")
  assert NOTES[hit.source][hit.start:hit.end] == hit.text and "pemetrexed" in hit.text


def test_bm25_bad_input_errors():
  with pytest.raises(ValueError, match="empty"):
    BM25Index([])
  with pytest.raises(ValueError, match="indexable"):
    BM25Index(["the of", ""])
  with pytest.raises(ValueError, match="used twice"):
    BM25Index(["a b", "c d"], ids=["x", "x"])
  with pytest.raises(ValueError, match="2 ids for 3"):
    BM25Index(["a", "b", "c"], ids=["x", "y"])
  with pytest.raises(ValueError, match="k must be"):
    BM25Index(["tumor"]).search("tumor", k=0)


# ---------------------------------------------------------------- dense

class HashEmbedClient:
  """Deterministic fake `LLMClient.embed`: a sum of fixed random vectors, one per lowercased word."""

  def __init__(self, dim: int = 64):
    self.dim, self.calls = dim, []

  def vector(self, word: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)

  def embed(self, texts):
    self.calls.append(list(texts))
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, t in enumerate(texts):
      for w in t.lower().replace(".", " ").replace(",", " ").split():
        out[i] += self.vector(w)
    return out * 3.0  # not unit rows: the index normalises


def test_dense_index_ranks_by_cosine_of_the_client_embeddings():
  client = HashEmbedClient()
  texts, ids = list(NOTES.values()), list(NOTES)
  index = DenseIndex(client, texts, ids, batch_size=2)
  assert [len(c) for c in client.calls] == [2, 2, 1]
  query = "ECOG performance status"
  e = client.embed(texts + [query]).astype(np.float64)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  expected = e[:-1] @ e[-1]
  np.testing.assert_allclose(index.scores(query), expected, atol=1e-5)
  hits = index.search(query, k=3)
  assert [h.doc_id for h in hits] == [ids[i] for i in np.argsort(-expected)[:3]]
  assert hits[0].doc_id == "clinic_2021-04-01"
  assert index.search("   ") == []


def test_dense_index_from_chunks_and_bad_clients():
  chunks = chunk_documents(NOTES, max_words=10, overlap=2)
  index = DenseIndex.from_chunks(chunks, HashEmbedClient())
  hit = index.search("metoprolol apixaban", k=1)[0]
  assert hit.source == "cardio_2020-11-20" and NOTES[hit.source][hit.start:hit.end] == hit.text

  class Wrong:
    def embed(self, texts):
      return np.zeros((len(texts) + 1, 4))
  with pytest.raises(ValueError, match=r"expected \[N, D\]"):
    DenseIndex(Wrong(), ["a", "b"])
  with pytest.raises(ValueError, match="empty"):
    DenseIndex(HashEmbedClient(), [])


# ---------------------------------------------------------------- fusion

def test_reciprocal_rank_fusion_on_hand_made_ranks():
  fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "d"]], k_rrf=60)
  expected = {"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63 + 1 / 62, "d": 1 / 63}
  assert [d for d, _ in fused] == ["b", "c", "a", "d"]
  for d, s in fused:
    assert s == pytest.approx(expected[d], abs=1e-15)
  # k_rrf = 0 and weights; ties keep first-seen order.
  fused = reciprocal_rank_fusion([["x", "y"], ["y", "x"]], k_rrf=0)
  assert [d for d, _ in fused] == ["x", "y"] and fused[0][1] == pytest.approx(1.5)
  fused = reciprocal_rank_fusion([["x", "y"], ["y", "x"]], k_rrf=1, weights=[1.0, 3.0])
  assert dict(fused) == pytest.approx({"x": 1 / 2 + 3 / 3, "y": 1 / 3 + 3 / 2})
  with pytest.raises(ValueError, match="twice"):
    reciprocal_rank_fusion([["a", "a"]])


class FixedIndex:
  def __init__(self, ranking):
    self.ranking = ranking

  def search(self, query, k=5):
    return [Hit(d, 10.0 - r, f"text {d}", r) for r, d in enumerate(self.ranking[:k], start=1)]


def test_hybrid_index_fuses_by_rank():
  hybrid = HybridIndex(FixedIndex(["a", "b", "c"]), FixedIndex(["b", "c", "d"]))
  hits = hybrid.search("anything", k=3)
  assert [h.doc_id for h in hits] == ["b", "c", "a"]
  assert [h.rank for h in hits] == [1, 2, 3]
  assert hits[0].score == pytest.approx(1 / 62 + 1 / 61) and hits[0].text == "text b"


def test_hybrid_bm25_and_dense_over_notes():
  ids, texts = list(NOTES), list(NOTES.values())
  hybrid = HybridIndex(BM25Index(texts, ids), DenseIndex(HashEmbedClient(), texts, ids))
  assert hybrid.search("adjuvant chemotherapy cisplatin", k=2)[0].doc_id == "clinic_2021-04-01"
  with pytest.raises(ValueError, match="at least one index"):
    HybridIndex()


# ---------------------------------------------------------------- loading

def test_load_documents_reads_txt_and_md_recursively(tmp_path):
  (tmp_path / "p1").mkdir()
  (tmp_path / "p1" / "2021-01-01_path.txt").write_text("pathology text", encoding="utf-8")
  (tmp_path / "b.md").write_text("# radiology", encoding="utf-8")
  (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
  docs = load_documents(tmp_path)
  assert docs == {"b.md": "# radiology", "p1/2021-01-01_path.txt": "pathology text"}
  (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
  with pytest.raises(ValueError, match=r"bad\.txt: not UTF-8"):
    load_documents(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_documents(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .txt/.md files"):
    load_documents(tmp_path / "empty")
