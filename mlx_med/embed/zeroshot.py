"""Zero-shot classification with prompt templates, as CLIP and MedImageInsight do it.

Each label is written into several prompt templates ("a {domain} showing {finding}." ...);
the text tower embeds every prompt, each embedding is L2-normalised, a label's prompts are
averaged and the mean is normalised again (CLIP's prompt ensembling). That gives a [K, E]
classifier; an image's logits are `exp(logit_scale) * cos(image, classifier_k) (+ logit_bias)`
with `logit_scale` in log space, as checkpoints store it.

Two ways to turn logits into scores (`mode`):

- "softmax" (single-label): probabilities over the K labels, summing to 1 per image. What a
  CLIP-style (UniCL/InfoNCE) model is trained for; use when each image has one label (add a
  "normal" label for images without finding).
- "sigmoid" (multi-label): an independent score per label, sigmoid(logit). Calibrated for a
  SigLIP model (pass its `logit_bias`); for a CLIP-style model without a bias it is a monotone
  function of the cosine, so per-label ROC AUCs equal those of the raw cosine although the
  values are not probabilities.

Labels are strings, either "domain/finding" (the synthetic dataset's `ALL_LABELS`) or a plain
finding name. `{finding}` is the part after the slash (underscores as spaces) and `{domain}` a
phrase for the modality: `domain_phrases[domain]` if given, else the synthetic dataset's
canonical phrase ("xray" -> "chest x-ray"), else the domain name itself; a label without a
domain uses "medical image".
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a {domain} showing {finding}.",
    "{finding} on {domain}.",
    "{domain} with {finding}.",
    "a medical image of {finding}.",
    "there is {finding}.",
)
NO_DOMAIN = "medical image"
MODES = ("softmax", "sigmoid")
_FIELDS = {"finding", "domain"}


class ZeroShotInputError(ValueError):
  """Bad labels, templates or embeddings for zero-shot scoring (one-line message)."""


class ZeroShotScores(NamedTuple):
  logits: np.ndarray  # [N, K] exp(logit_scale) * cosine (+ bias)
  probs: np.ndarray   # [N, K] softmax over labels or per-label sigmoid, by mode


def parse_list(text: str | Sequence[str], what: str = "labels") -> list[str]:
  """"a;b;c" (or a list) -> ["a", "b", "c"], stripped, empty items dropped; duplicates are an error."""
  items = [t.strip() for t in (text.split(";") if isinstance(text, str) else text)]
  items = [t for t in items if t]
  if not items:
    raise ZeroShotInputError(f"no {what} given; pass them separated by ';', e.g. \"a;b;c\"")
  seen = set()
  for item in items:
    if item in seen:
      raise ZeroShotInputError(f"{what} list repeats {item!r}; give each once")
    seen.add(item)
  return items


def parse_templates(templates: str | Sequence[str] | None) -> list[str]:
  """Checks templates: each names {finding} and uses no field but {finding} and {domain}."""
  if templates is None:
    return list(DEFAULT_TEMPLATES)
  out = parse_list(templates, "templates")
  for template in out:
    try:
      fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
      raise ZeroShotInputError(f"template {template!r} is malformed ({err}); use {{finding}} and {{domain}}") from None
    if "finding" not in fields:
      raise ZeroShotInputError(f"template {template!r} has no {{finding}}; e.g. \"a {{domain}} showing {{finding}}.\"")
    unknown = fields - _FIELDS
    if unknown:
      raise ZeroShotInputError(f"template {template!r} uses unknown field(s) {sorted(unknown)}; "
                               "only {finding} and {domain} exist")
  return out


def _default_domain_phrases() -> dict[str, str]:
  from mlx_med.embed import synth
  return {domain: phrases[0] for domain, phrases in synth.DOMAIN_PHRASES.items()}


def prompts_for(label: str, templates: Sequence[str], domain_phrases: Mapping[str, str] | None = None) -> list[str]:
  """The prompts of one label ("domain/finding" or "finding")."""
  if "/" in label:
    domain, finding = label.split("/", 1)
    phrases = _default_domain_phrases() if domain_phrases is None else domain_phrases
    domain_text = phrases.get(domain, domain.replace("_", " "))
  else:
    finding, domain_text = label, NO_DOMAIN
  finding = finding.replace("_", " ")
  return [t.format(finding=finding, domain=domain_text) for t in templates]


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_classifier(embed_texts: Callable[[list[str]], Any], labels: Sequence[str],
                    templates: str | Sequence[str] | None = None, *,
                    domain_phrases: Mapping[str, str] | None = None) -> np.ndarray:
  """[K, E] zero-shot classifier: per label, the renormalised mean of its normalised prompt embeddings.

  `embed_texts(list_of_str) -> [n, E]` is e.g. `Embedder.embed_texts`; it is called once with
  every prompt.
  """
  labels = parse_list(labels) if isinstance(labels, str) else list(labels)
  templates = parse_templates(templates)
  prompts = [p for label in labels for p in prompts_for(label, templates, domain_phrases)]
  emb = np.asarray(embed_texts(prompts), np.float64)
  if emb.ndim != 2 or emb.shape[0] != len(prompts):
    raise ZeroShotInputError(f"embed_texts returned shape {emb.shape} for {len(prompts)} prompts; expected "
                             f"[{len(prompts)}, E]")
  per_label = _normalise(emb).reshape(len(labels), len(templates), -1).mean(axis=1)
  return _normalise(per_label).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
  z = np.exp(x - x.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def zeroshot_scores(image_emb: Any, classifier: Any, logit_scale: Any = None, *, logit_bias: float | None = None,
                    mode: str = "softmax", templates: str | Sequence[str] | None = None,
                    domain_phrases: Mapping[str, str] | None = None) -> ZeroShotScores:
  """Zero-shot logits and scores of images against a [K, E] text classifier.

  Args:
    image_emb: [N, E] image embeddings (normalised here).
    classifier: [K, E] from `text_classifier`.
    logit_scale: log-space temperature (logits = exp(logit_scale) * cosine + logit_bias).
    mode: "softmax" (single-label) or "sigmoid" (multi-label); see the module docstring.

  Also accepts `zeroshot_scores(embedder, images, labels, ...)`: an `Embedder` (anything with
  `embed_images`, `embed_texts`, `logit_scale`), images (paths or a normalised batch) and labels
  ("a;b;c" or a list); its logit_bias is used in sigmoid mode.
  """
  if hasattr(image_emb, "embed_images"):
    embedder, images, labels = image_emb, classifier, logit_scale
    classifier = text_classifier(embedder.embed_texts, labels, templates, domain_phrases=domain_phrases)
    bias = getattr(embedder, "logit_bias", None) if mode == "sigmoid" and logit_bias is None else logit_bias
    return zeroshot_scores(embedder.embed_images(images), classifier, embedder.logit_scale, logit_bias=bias, mode=mode)
  if mode not in MODES:
    raise ZeroShotInputError(f"unknown mode {mode!r}; choose 'softmax' (single-label) or 'sigmoid' (multi-label)")
  if logit_scale is None:
    raise ZeroShotInputError("logit_scale is required (log space, e.g. Embedder.logit_scale)")
  img = np.asarray(image_emb, np.float64)
  cls = np.asarray(classifier, np.float64)
  if img.ndim != 2 or cls.ndim != 2 or img.shape[1] != cls.shape[1]:
    raise ZeroShotInputError(f"image embeddings {img.shape} and classifier {cls.shape} must be [N, E] and [K, E] "
                             "with the same E; embed both with the same model")
  logits = np.exp(float(logit_scale)) * (_normalise(img) @ _normalise(cls).T)
  if logit_bias is not None:
    logits = logits + float(logit_bias)
  probs = _softmax(logits) if mode == "softmax" else 1.0 / (1.0 + np.exp(-logits))
  return ZeroShotScores(logits.astype(np.float32), probs.astype(np.float32))
